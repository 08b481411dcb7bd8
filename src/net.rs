//! HTTP connections that make no progress are closed: no byte read and none
//! written for the idle time. This bounds what the request layer cannot see
//! (a client trickling its headers, a keep-alive connection left open, a
//! reader that stopped reading a download) while a transfer that keeps
//! moving, however slowly and however long, is never cut.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// A connection with an idle deadline that every read or write moves on.
pub struct IdleIo<T> {
    inner: T,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl<T> IdleIo<T> {
    pub fn new(inner: T, idle: Duration) -> IdleIo<T> {
        IdleIo {
            inner,
            idle,
            deadline: Box::pin(tokio::time::sleep(idle)),
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// What the inner connection answered, seen by the idle clock: a
    /// finished read or write (`moves`) is progress; while it waits, the
    /// deadline may pass.
    fn watch<R>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<R>>,
        moves: bool,
    ) -> Poll<io::Result<R>> {
        match polled {
            Poll::Ready(result) => {
                if moves {
                    let next = Instant::now() + self.idle;
                    self.deadline.as_mut().reset(next);
                }
                Poll::Ready(result)
            }
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no progress for {} s", self.idle.as_secs()),
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        this.watch(cx, polled, true)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.watch(cx, polled, true)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        this.watch(cx, polled, false)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.watch(cx, polled, true)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A listener whose connections are [`IdleIo`].
pub struct IdleListener<L> {
    inner: L,
    idle: Duration,
}

impl<L> IdleListener<L> {
    pub fn new(inner: L, idle: Duration) -> IdleListener<L> {
        IdleListener { inner, idle }
    }
}

impl<L: axum::serve::Listener> axum::serve::Listener for IdleListener<L> {
    type Io = IdleIo<L::Io>;
    type Addr = L::Addr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (io, addr) = self.inner.accept().await;
        (IdleIo::new(io, self.idle), addr)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_silent_peer_is_cut_and_a_slow_one_is_not() {
        let (client, server) = tokio::io::duplex(64);
        let mut server = IdleIo::new(server, Duration::from_secs(10));
        let mut client = client;
        // A byte every 8 s keeps it open past 30 s.
        let writer = tokio::spawn(async move {
            for _ in 0..4 {
                tokio::time::sleep(Duration::from_secs(8)).await;
                client.write_all(b"x").await.unwrap();
            }
            // Then silence (the client stays open).
            tokio::time::sleep(Duration::from_secs(60)).await;
            drop(client);
        });
        let mut got = [0u8; 1];
        for _ in 0..4 {
            server.read_exact(&mut got).await.unwrap();
        }
        let err = server.read_exact(&mut got).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        writer.abort();
    }
}
