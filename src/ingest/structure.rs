//! A structural walk of a whole data set: every element header is decoded
//! and every value skipped (by seeking where the bytes are stored plainly),
//! so a truncated or overrunning instance is refused without reading its
//! pixel data into memory. The header parse in [`super::header`] only looks
//! at the start of the object; this is what proves the rest is whole.

use std::io::{self, BufReader, Read, Seek, SeekFrom};

use dicom_core::header::{HasLength, Header, Length, SequenceItemHeader};
use dicom_core::{Tag, VR};
use dicom_encoding::decode::DecodeFrom;
use dicom_encoding::transfer_syntax::Codec;
use dicom_encoding::TransferSyntaxIndex;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

const ITEM_DELIMITER: Tag = Tag(0xFFFE, 0xE00D);
const PIXEL_DATA: Tag = Tag(0x7FE0, 0x0010);
/// Deeper nesting than this is refused (no real object comes close; a
/// crafted one could otherwise exhaust the stack).
const MAX_DEPTH: usize = 64;

type Decoder<'a> = Box<dyn DecodeFrom<dyn Read + 'a>>;

/// Walk the data set that starts at `data_start` in `file`, encoded in
/// `transfer_syntax`. `Err` carries a reason a sender can act on.
pub fn check<'a>(
    mut file: impl Read + Seek + 'a,
    data_start: u64,
    transfer_syntax: &str,
) -> Result<(), String> {
    let ts = TransferSyntaxRegistry
        .get(transfer_syntax)
        .ok_or_else(|| format!("unknown transfer syntax {transfer_syntax}"))?;
    let decoder: Decoder<'a> = ts
        .decoder_for::<dyn Read + 'a>()
        .ok_or_else(|| format!("cannot decode transfer syntax {transfer_syntax}"))?;
    let total = file.seek(SeekFrom::End(0)).map_err(io_reason)?;
    file.seek(SeekFrom::Start(data_start)).map_err(io_reason)?;
    let mut input: Input<'a> = match ts.codec() {
        Codec::Dataset(Some(adapter)) => {
            // Deflated: no way to seek, so the walk reads through.
            let stream = adapter.adapt_reader(Box::new(file));
            Input::stream(stream)
        }
        Codec::Dataset(None) => {
            return Err(format!("cannot decode transfer syntax {transfer_syntax}"))
        }
        _ => Input::seekable(
            Box::new(BufReader::with_capacity(8 * 1024, file)),
            data_start,
            total,
        ),
    };
    let start = input.pos;
    let mut walker = Walker {
        decoder,
        layout: None,
        header_end: None,
    };
    walker.data_set(&mut input, None, false, 0)?;
    // The header parse reads everything before (0029,0000) into memory:
    // what it will find there must be bounded, whatever lengths an element
    // claims (they are proven real by now).
    let header_bytes = walker.header_end.unwrap_or(input.pos) - start;
    if header_bytes > super::header::HEADER_LIMIT {
        return Err(format!(
            "the attributes before (0029,0000) take {header_bytes} bytes; at most {} are accepted",
            super::header::HEADER_LIMIT
        ));
    }
    Ok(())
}

/// Where one top-level element's value lies in a stored object.
#[derive(Debug, Clone, PartialEq)]
pub struct ElementSpan {
    pub tag: Tag,
    pub vr: VR,
    /// Offset of the value (after the element header) from the object's start.
    pub offset: u64,
    /// Value length; `None` for undefined length (sequences, encapsulated
    /// pixel data).
    pub length: Option<u32>,
    /// Encapsulated pixel data: (offset, length) of each item, the Basic
    /// Offset Table first.
    pub fragments: Vec<(u64, u32)>,
}

/// The top-level elements of the data set at `data_start`, with where their
/// values are, for serving bulk data and frames by seeking. Objects in a
/// deflated transfer syntax have no addressable values.
pub fn layout<'a>(
    mut file: impl Read + Seek + 'a,
    data_start: u64,
    transfer_syntax: &str,
) -> Result<Vec<ElementSpan>, String> {
    let ts = TransferSyntaxRegistry
        .get(transfer_syntax)
        .ok_or_else(|| format!("unknown transfer syntax {transfer_syntax}"))?;
    if !matches!(ts.codec(), Codec::None | Codec::EncapsulatedPixelData(..)) {
        return Err(format!(
            "values of a {} object are not addressable",
            ts.name()
        ));
    }
    let decoder: Decoder<'a> = ts
        .decoder_for::<dyn Read + 'a>()
        .ok_or_else(|| format!("cannot decode transfer syntax {transfer_syntax}"))?;
    let total = file.seek(SeekFrom::End(0)).map_err(io_reason)?;
    file.seek(SeekFrom::Start(data_start)).map_err(io_reason)?;
    let mut input = Input::seekable(
        Box::new(BufReader::with_capacity(8 * 1024, file)),
        data_start,
        total,
    );
    let mut walker = Walker {
        decoder,
        layout: Some(Vec::new()),
        header_end: None,
    };
    walker.data_set(&mut input, None, false, 0)?;
    Ok(walker.layout.unwrap_or_default())
}

/// The size of one value of a binary VR whose length must be a multiple of
/// it (PS3.5 6.2).
fn binary_value_size(vr: VR) -> Option<u32> {
    match vr {
        VR::US | VR::SS | VR::OW => Some(2),
        VR::UL | VR::SL | VR::FL | VR::AT | VR::OL | VR::OF => Some(4),
        VR::FD | VR::SV | VR::UV | VR::OD | VR::OV => Some(8),
        _ => None,
    }
}

fn io_reason(e: io::Error) -> String {
    format!("cannot read the stored data set: {e}")
}

trait ReadSeek: Read + Seek {}
impl<T: Read + Seek> ReadSeek for T {}

/// The bytes being walked, with the position counted and one byte of
/// look-ahead to tell a clean end from a truncated header.
struct Input<'a> {
    source: Source<'a>,
    pos: u64,
    peeked: Option<u8>,
}

enum Source<'a> {
    Seekable {
        reader: Box<dyn ReadSeek + 'a>,
        end: u64,
    },
    Stream(Box<dyn Read + 'a>),
}

impl<'a> Input<'a> {
    fn seekable(reader: Box<dyn ReadSeek + 'a>, start: u64, end: u64) -> Self {
        Input {
            source: Source::Seekable { reader, end },
            pos: start,
            peeked: None,
        }
    }

    fn stream(reader: Box<dyn Read + 'a>) -> Self {
        Input {
            source: Source::Stream(reader),
            pos: 0,
            peeked: None,
        }
    }

    fn at_end(&mut self) -> Result<bool, String> {
        if self.peeked.is_some() {
            return Ok(false);
        }
        match &mut self.source {
            Source::Seekable { end, .. } => Ok(self.pos >= *end),
            Source::Stream(r) => {
                let mut byte = [0u8; 1];
                loop {
                    match r.read(&mut byte) {
                        Ok(0) => return Ok(true),
                        Ok(_) => {
                            self.peeked = Some(byte[0]);
                            return Ok(false);
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(io_reason(e)),
                    }
                }
            }
        }
    }

    /// Skip exactly `len` bytes of value, failing if the object ends first.
    fn skip(&mut self, len: u32, tag: Tag) -> Result<(), String> {
        let truncated = || format!("data set truncated inside element {tag}");
        let mut remaining = u64::from(len);
        // The look-ahead byte, if any, is the first byte of this value.
        if remaining > 0 && self.peeked.take().is_some() {
            remaining -= 1;
            self.pos += 1;
        }
        match &mut self.source {
            Source::Seekable { reader, end } => {
                if self.pos + remaining > *end {
                    return Err(truncated());
                }
                let offset = i64::try_from(remaining).map_err(|_| truncated())?;
                reader.seek(SeekFrom::Current(offset)).map_err(io_reason)?;
            }
            Source::Stream(r) => {
                let copied = io::copy(&mut r.by_ref().take(remaining), &mut io::sink())
                    .map_err(io_reason)?;
                if copied != remaining {
                    return Err(truncated());
                }
            }
        }
        self.pos += remaining;
        Ok(())
    }
}

impl Read for Input<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if let Some(b) = self.peeked.take() {
            buf[0] = b;
            self.pos += 1;
            return Ok(1);
        }
        let n = match &mut self.source {
            Source::Seekable { reader, .. } => reader.read(buf)?,
            Source::Stream(r) => r.read(buf)?,
        };
        self.pos += n as u64;
        Ok(n)
    }
}

struct Walker<'a> {
    decoder: Decoder<'a>,
    /// Top-level element positions, when asked for.
    layout: Option<Vec<ElementSpan>>,
    /// Where the first top-level element at or after (0029,0000) starts.
    header_end: Option<u64>,
}

impl<'a> Walker<'a> {
    /// Walk elements until `end` (a defined-length item), an item delimiter
    /// (`in_undefined_item`), or the end of the object (top level).
    fn data_set(
        &mut self,
        input: &mut Input<'a>,
        end: Option<u64>,
        in_undefined_item: bool,
        depth: usize,
    ) -> Result<(), String> {
        if depth > MAX_DEPTH {
            return Err("sequences nested too deeply".into());
        }
        loop {
            match end {
                Some(end) if input.pos == end => return Ok(()),
                Some(end) if input.pos > end => {
                    return Err(format!("element overruns its item (offset {})", input.pos))
                }
                None if !in_undefined_item && input.at_end()? => return Ok(()),
                _ => {}
            }
            let at = input.pos;
            let (header, _) = self
                .decoder
                .decode_header(input)
                .map_err(|e| format!("cannot read element header at offset {at}: {e}"))?;
            if header.tag() == ITEM_DELIMITER {
                if in_undefined_item {
                    return Ok(());
                }
                return Err(format!("unexpected item delimiter at offset {at}"));
            }
            let len = header.length();
            if depth == 0 && self.header_end.is_none() && header.tag() >= Tag(0x0029, 0x0000) {
                self.header_end = Some(at);
            }
            if depth == 0 {
                if let Some(layout) = &mut self.layout {
                    layout.push(ElementSpan {
                        tag: header.tag(),
                        vr: header.vr(),
                        offset: input.pos,
                        length: len.get(),
                        fragments: Vec::new(),
                    });
                }
            }
            if header.vr() == VR::SQ
                || (len.is_undefined() && header.vr() == VR::UN && header.tag() != PIXEL_DATA)
            {
                self.sequence(input, len, header.tag(), depth + 1)?;
            } else if len.is_undefined() {
                // Only sequences (SQ, or UN read as one) and encapsulated
                // Pixel Data may have an undefined length. A parser would
                // take it for a value of 4 GiB, and allocate that (found by
                // the `dicom_data_set` fuzz target).
                if header.tag() != PIXEL_DATA {
                    return Err(format!(
                        "element {} ({}) at offset {at} has an undefined length, which only \
                         sequences and encapsulated Pixel Data may have",
                        header.tag(),
                        header.vr()
                    ));
                }
                self.fragments(input, depth == 0)?;
            } else {
                let length = defined(len, header.tag())?;
                if let Some(size) = binary_value_size(header.vr()) {
                    // A parser reads whole values and would lose its place
                    // in the data set (the next "header" is then any bytes,
                    // any length; found by the `dicom_data_set` fuzz target).
                    if length % size != 0 {
                        return Err(format!(
                            "element {} ({}) at offset {at} has length {length}, not a multiple of {size}",
                            header.tag(),
                            header.vr()
                        ));
                    }
                }
                input.skip(length, header.tag())?;
            }
        }
    }

    fn sequence(
        &mut self,
        input: &mut Input<'a>,
        len: Length,
        tag: Tag,
        depth: usize,
    ) -> Result<(), String> {
        let end = len.get().map(|l| input.pos + u64::from(l));
        loop {
            if let Some(end) = end {
                if input.pos == end {
                    return Ok(());
                }
                if input.pos > end {
                    return Err(format!("sequence {tag} overruns its length"));
                }
            }
            let at = input.pos;
            let item = self.decoder.decode_item_header(input).map_err(|e| {
                format!("cannot read item header in sequence {tag} at offset {at}: {e}")
            })?;
            match item {
                SequenceItemHeader::Item { len } if len.is_undefined() => {
                    self.data_set(input, None, true, depth)?;
                }
                SequenceItemHeader::Item { len } => {
                    let item_end = input.pos + u64::from(defined(len, tag)?);
                    self.data_set(input, Some(item_end), false, depth)?;
                }
                SequenceItemHeader::SequenceDelimiter if end.is_none() => return Ok(()),
                other => {
                    return Err(format!(
                        "unexpected {other:?} in sequence {tag} at offset {at}"
                    ))
                }
            }
        }
    }

    /// Encapsulated Pixel Data: items of defined length up to a sequence delimiter.
    fn fragments(&mut self, input: &mut Input<'a>, top_level: bool) -> Result<(), String> {
        loop {
            let at = input.pos;
            let item = self.decoder.decode_item_header(input).map_err(|e| {
                format!("cannot read pixel data fragment header at offset {at}: {e}")
            })?;
            match item {
                SequenceItemHeader::Item { len } => {
                    let len = defined(len, PIXEL_DATA)?;
                    if let Some(span) = self
                        .layout
                        .as_mut()
                        .filter(|_| top_level)
                        .and_then(|l| l.last_mut())
                    {
                        span.fragments.push((input.pos, len));
                    }
                    input.skip(len, PIXEL_DATA)?
                }
                SequenceItemHeader::SequenceDelimiter => return Ok(()),
                SequenceItemHeader::ItemDelimiter => {
                    return Err(format!(
                        "item delimiter among pixel data fragments at offset {at}"
                    ))
                }
            }
        }
    }
}

fn defined(len: Length, tag: Tag) -> Result<u32, String> {
    len.get()
        .ok_or_else(|| format!("undefined length where a defined one is required ({tag})"))
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use dicom_core::value::{DataSetSequence, PixelFragmentSequence};
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_dictionary_std::tags;
    use dicom_object::InMemDicomObject;
    use dicom_transfer_syntax_registry::entries;

    use super::*;

    const ELE: &str = "1.2.840.10008.1.2.1";
    const ILE: &str = "1.2.840.10008.1.2";
    const JPEG: &str = "1.2.840.10008.1.2.4.50";

    fn encode(obj: &InMemDicomObject, ts: &str) -> Vec<u8> {
        let ts = TransferSyntaxRegistry.get(ts).unwrap();
        let mut out = Vec::new();
        obj.write_dataset_with_ts(&mut out, ts).unwrap();
        out
    }

    fn sample(pixel: DataElement<InMemDicomObject>) -> InMemDicomObject {
        let item = InMemDicomObject::from_element_iter([DataElement::new(
            tags::CODE_VALUE,
            VR::SH,
            PrimitiveValue::from("T-0001"),
        )]);
        InMemDicomObject::from_element_iter([
            DataElement::new(
                tags::SOP_INSTANCE_UID,
                VR::UI,
                PrimitiveValue::from("1.2.3"),
            ),
            DataElement::new(
                tags::ANATOMIC_REGION_SEQUENCE,
                VR::SQ,
                DataSetSequence::from(vec![item]),
            ),
            DataElement::new(tags::ROWS, VR::US, PrimitiveValue::from(2u16)),
            pixel,
        ])
    }

    fn native() -> InMemDicomObject {
        sample(DataElement::new(
            tags::PIXEL_DATA,
            VR::OB,
            PrimitiveValue::from(vec![7u8; 4096]),
        ))
    }

    fn encapsulated() -> InMemDicomObject {
        let fragments = PixelFragmentSequence::new(vec![], vec![vec![1u8; 1000], vec![2u8; 2000]]);
        sample(DataElement::new(tags::PIXEL_DATA, VR::OB, fragments))
    }

    #[test]
    fn whole_data_sets_pass() {
        for (obj, ts) in [(native(), ELE), (native(), ILE), (encapsulated(), JPEG)] {
            let bytes = encode(&obj, ts);
            assert_eq!(check(Cursor::new(&bytes), 0, ts), Ok(()), "{ts}");
        }
        assert_eq!(
            check(Cursor::new(Vec::new()), 0, ELE),
            Ok(()),
            "empty data set walks"
        );
    }

    #[test]
    fn every_truncation_is_refused() {
        for (obj, ts) in [(native(), ELE), (native(), ILE), (encapsulated(), JPEG)] {
            let bytes = encode(&obj, ts);
            // Cutting anywhere inside an element must fail; cutting exactly
            // at an element boundary is a shorter valid data set, which the
            // header check catches when required attributes go missing.
            for cut in [1, 2, 7, 100, 1001, bytes.len() - 12] {
                let short = &bytes[..bytes.len() - cut];
                let result = check(Cursor::new(short), 0, ts);
                assert!(result.is_err(), "{ts}: cut {cut} accepted");
            }
        }
    }

    #[test]
    fn data_start_offset_is_honoured_and_deflate_is_walked() {
        let mut bytes = vec![0xAAu8; 300];
        bytes.extend(encode(&native(), ELE));
        assert_eq!(check(Cursor::new(&bytes), 300, ELE), Ok(()));

        let deflated = encode(&native(), entries::DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN.uid());
        let ts = entries::DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN.uid();
        assert_eq!(check(Cursor::new(&deflated), 0, ts), Ok(()));
        let cut = &deflated[..deflated.len() - 10];
        assert!(check(Cursor::new(cut), 0, ts).is_err());
    }
}
