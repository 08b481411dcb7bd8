//! Receiving P-DATA-TF PDUs (PS3.8 §9.3.5) straight from the socket.
//!
//! Why not `AsyncServerAssociation::receive` for data: it reads the wire
//! into a growing buffer (which moves its unread part as it grows), copies
//! the whole PDU out of it, then copies every value out of that. For a CT
//! study that is three passes over every byte before the ingest sees it.
//! Here a value is read from the socket into its own buffer once. Every
//! other PDU type is left in the association's read buffer, where
//! dicom-ul's own `receive` parses it as before.

use std::time::Duration;

use bytes::{Buf, BufMut, BytesMut};
use dicom_ul::association::server::AsyncServerAssociation;
use dicom_ul::association::AsyncAssociation;
use dicom_ul::pdu::{PDataValue, PDataValueType, Pdu};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

const P_DATA_TF: u8 = 0x04;
/// PDU type, reserved byte, PDU length (u32 BE).
const PDU_HEADER: usize = 6;
/// Item length (u32 BE), presentation context ID, message control header.
const ITEM_HEADER: usize = 6;

/// Why no PDU could be read.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("no PDU within the idle timeout")]
    Idle,
    #[error("connection closed")]
    Closed,
    #[error("read failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("P-DATA-TF PDU of {length} bytes exceeds the negotiated maximum of {max}")]
    TooLarge { length: u32, max: u32 },
    #[error("malformed P-DATA-TF PDU: {0}")]
    Malformed(&'static str),
    #[error(transparent)]
    Association(#[from] dicom_ul::association::Error),
}

/// The next PDU of the association, waiting at most `idle` for it.
pub async fn receive<S>(
    assoc: &mut AsyncServerAssociation<S>,
    idle: Duration,
) -> Result<Pdu, ReceiveError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let max = assoc.acceptor_max_pdu_length();
    let data = tokio::time::timeout(idle, async {
        let (socket, buffer) = assoc.get_mut();
        fill(socket, buffer, PDU_HEADER + ITEM_HEADER, PDU_HEADER).await?;
        if buffer[0] != P_DATA_TF {
            return Ok(None);
        }
        let length = u32::from_be_bytes([buffer[2], buffer[3], buffer[4], buffer[5]]);
        // dicom-ul's strict mode, which the rest of the association uses.
        if length > max {
            return Err(ReceiveError::TooLarge { length, max });
        }
        buffer.advance(PDU_HEADER);
        read_values(socket, buffer, length as usize).await.map(Some)
    })
    .await
    .map_err(|_| ReceiveError::Idle)??;
    match data {
        Some(data) => Ok(Pdu::PData { data }),
        // Another PDU type: its header is still in the buffer.
        None => Ok(assoc.receive().await?),
    }
}

/// The presentation data values of one P-DATA-TF PDU of `length` bytes
/// (its header consumed).
async fn read_values<S>(
    socket: &mut S,
    buffer: &mut BytesMut,
    length: usize,
) -> Result<Vec<PDataValue>, ReceiveError>
where
    S: AsyncRead + Unpin,
{
    let mut left = length;
    let mut values = Vec::with_capacity(1);
    while left > 0 {
        if left < ITEM_HEADER {
            return Err(ReceiveError::Malformed("item header past the PDU's end"));
        }
        // The next item's header, and the PDU after it when it is a small
        // one, may come with this read; never more than the PDU holds.
        fill(
            socket,
            buffer,
            left.min(PDU_HEADER + ITEM_HEADER),
            ITEM_HEADER,
        )
        .await?;
        let item = u32::from_be_bytes([buffer[0], buffer[1], buffer[2], buffer[3]]) as usize;
        let context = buffer[4];
        let control = buffer[5];
        if item < 2 {
            return Err(ReceiveError::Malformed("item length below 2"));
        }
        if item + 4 > left {
            return Err(ReceiveError::Malformed("item longer than its PDU"));
        }
        buffer.advance(ITEM_HEADER);
        left -= item + 4;
        let data = read_exact_into(socket, buffer, item - 2).await?;
        values.push(PDataValue {
            presentation_context_id: context,
            value_type: if control & 0x01 != 0 {
                PDataValueType::Command
            } else {
                PDataValueType::Data
            },
            is_last: control & 0x02 != 0,
            data,
        });
    }
    Ok(values)
}

/// Read until `buffer` holds at least `need` bytes, reading no more than
/// up to `upto` bytes in it (so a value's bytes mostly bypass it).
async fn fill<S>(
    socket: &mut S,
    buffer: &mut BytesMut,
    upto: usize,
    need: usize,
) -> Result<(), ReceiveError>
where
    S: AsyncRead + Unpin,
{
    while buffer.len() < need {
        let room = upto.max(need) - buffer.len();
        if socket.read_buf(&mut (&mut *buffer).limit(room)).await? == 0 {
            return Err(ReceiveError::Closed);
        }
    }
    Ok(())
}

/// `n` bytes: first what the buffer already holds, the rest read from the
/// socket straight into the value's own allocation.
async fn read_exact_into<S>(
    socket: &mut S,
    buffer: &mut BytesMut,
    n: usize,
) -> Result<Vec<u8>, ReceiveError>
where
    S: AsyncRead + Unpin,
{
    let mut out = Vec::with_capacity(n);
    let buffered = buffer.len().min(n);
    out.extend_from_slice(&buffer[..buffered]);
    buffer.advance(buffered);
    while out.len() < n {
        let room = n - out.len();
        if socket.read_buf(&mut (&mut out).limit(room)).await? == 0 {
            return Err(ReceiveError::Closed);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A P-DATA-TF PDU with the given (context, control, data) items.
    fn pdu(items: &[(u8, u8, &[u8])]) -> Vec<u8> {
        let mut body = Vec::new();
        for (context, control, data) in items {
            body.extend_from_slice(&((data.len() + 2) as u32).to_be_bytes());
            body.push(*context);
            body.push(*control);
            body.extend_from_slice(data);
        }
        let mut out = vec![P_DATA_TF, 0];
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    async fn values(wire: &[u8], buffered: usize) -> Result<Vec<PDataValue>, ReceiveError> {
        let mut buffer = BytesMut::from(&wire[..buffered]);
        let mut socket = &wire[buffered..];
        fill(&mut socket, &mut buffer, PDU_HEADER, PDU_HEADER).await?;
        let length = u32::from_be_bytes([buffer[2], buffer[3], buffer[4], buffer[5]]);
        buffer.advance(PDU_HEADER);
        read_values(&mut socket, &mut buffer, length as usize).await
    }

    #[tokio::test]
    async fn values_are_split_whatever_the_buffer_already_holds() {
        let big: Vec<u8> = (0..70_000u32).map(|i| i as u8).collect();
        let wire = pdu(&[(1, 0x03, b"cmd"), (3, 0x00, &big), (3, 0x02, b"end")]);
        for buffered in [0, 3, 6, 10, 13, 5_000, wire.len()] {
            let got = values(&wire, buffered).await.unwrap();
            assert_eq!(got.len(), 3, "buffered {buffered}");
            assert_eq!(got[0].presentation_context_id, 1);
            assert_eq!(got[0].value_type, PDataValueType::Command);
            assert!(got[0].is_last);
            assert_eq!(got[0].data, b"cmd");
            assert_eq!(got[1].value_type, PDataValueType::Data);
            assert!(!got[1].is_last);
            assert_eq!(got[1].data, big);
            assert!(got[2].is_last);
            assert_eq!(got[2].data, b"end");
        }
    }

    #[tokio::test]
    async fn bad_lengths_are_refused() {
        // An item claiming more than its PDU holds.
        let mut wire = pdu(&[(1, 0x00, b"abcdef")]);
        wire[PDU_HEADER + 3] = 200;
        assert!(matches!(
            values(&wire, 0).await,
            Err(ReceiveError::Malformed(_))
        ));
        // An item length below the two header bytes it counts.
        let mut wire = pdu(&[(1, 0x00, b"")]);
        wire[PDU_HEADER + 3] = 1;
        assert!(matches!(
            values(&wire, 0).await,
            Err(ReceiveError::Malformed(_))
        ));
        // The connection closing mid-value.
        let wire = pdu(&[(1, 0x00, &[7u8; 100])]);
        assert!(matches!(
            values(&wire[..50], 0).await,
            Err(ReceiveError::Closed)
        ));
    }
}
