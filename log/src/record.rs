//! The on-disk record format: encoding, decoding and the CRC32C that guards every record.
//!
//! Layout, all integers little-endian:
//! `len u32 | crc32c u32 | kind u8 | flags u8 | topic_len u16 | meta_len u32 | received_at i64 | topic | meta | payload`.
//! `len` counts the bytes after the crc field and the crc covers exactly those bytes, so a record
//! can be validated without knowing where it sits. A `len` of zero means "no record here", which
//! is what preallocated or zero-filled space at the end of a file reads as.

use bytes::{BufMut, Bytes, BytesMut};

use crate::{Entry, LogError, Record};

/// Bytes before the body: the `len` and `crc` fields.
pub(crate) const FRAME_LEN: usize = 8;
/// Fixed part of the body: kind, flags, topic_len, meta_len, received_at.
pub(crate) const FIXED_LEN: usize = 16;

/// A record that has been measured and checksummed, ready to be copied into the pending buffer.
///
/// The CRC does not depend on the record's position, so it is computed before the appender
/// takes the log's lock; only the memory copy happens under it.
pub(crate) struct Prepared<'a> {
    record: Record<'a>,
    body_len: u32,
    crc: u32,
}

impl<'a> Prepared<'a> {
    /// Checks the field limits and computes the checksum.
    pub(crate) fn new(record: Record<'a>) -> Result<Self, LogError> {
        if record.topic.len() > u16::MAX as usize {
            return Err(LogError::TooLarge {
                bytes: record.topic.len() as u64,
                max: u16::MAX as u64,
            });
        }
        let body = FIXED_LEN as u64
            + record.topic.len() as u64
            + record.meta.len() as u64
            + record.payload.len() as u64;
        // The meta length is a u32 too, but it is bounded by the body length checked here.
        if body > u32::MAX as u64 {
            return Err(LogError::TooLarge {
                bytes: body + FRAME_LEN as u64,
                max: u32::MAX as u64,
            });
        }
        let fixed = fixed_fields(&record);
        let mut crc = crc32c::crc32c(&fixed);
        crc = crc32c::crc32c_append(crc, record.topic);
        crc = crc32c::crc32c_append(crc, record.meta);
        crc = crc32c::crc32c_append(crc, record.payload);
        Ok(Prepared {
            record,
            body_len: body as u32,
            crc,
        })
    }

    /// Total encoded size, frame included; this is how far the record advances the position.
    pub(crate) fn size(&self) -> u64 {
        FRAME_LEN as u64 + self.body_len as u64
    }

    /// Appends the encoded record to `buf`.
    pub(crate) fn encode_into(&self, buf: &mut BytesMut) {
        buf.put_u32_le(self.body_len);
        buf.put_u32_le(self.crc);
        buf.put_slice(&fixed_fields(&self.record));
        buf.put_slice(self.record.topic);
        buf.put_slice(self.record.meta);
        buf.put_slice(self.record.payload);
    }
}

fn fixed_fields(record: &Record<'_>) -> [u8; FIXED_LEN] {
    let mut out = [0u8; FIXED_LEN];
    out[0] = record.kind;
    out[1] = record.flags;
    out[2..4].copy_from_slice(&(record.topic.len() as u16).to_le_bytes());
    out[4..8].copy_from_slice(&(record.meta.len() as u32).to_le_bytes());
    out[8..16].copy_from_slice(&record.received_at.to_le_bytes());
    out
}

/// Why a record could not be decoded at some offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Bad {
    /// The frame says the record needs this many bytes (frame included) but the buffer ends
    /// before that. Whether that is damage depends on what the caller knows about the buffer.
    Incomplete { needed: u64 },
    /// A zero length: nothing was ever written here.
    Empty,
    /// The bytes are not a valid record.
    Invalid(&'static str),
}

/// Reads the frame at the start of `buf` and returns the record's total size, or why not.
pub(crate) fn frame_size(buf: &[u8]) -> Result<u64, Bad> {
    if buf.len() < FRAME_LEN {
        return Err(Bad::Incomplete {
            needed: FRAME_LEN as u64,
        });
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if len == 0 {
        return Err(Bad::Empty);
    }
    if (len as usize) < FIXED_LEN {
        return Err(Bad::Invalid("length shorter than the fixed header"));
    }
    Ok(FRAME_LEN as u64 + len as u64)
}

/// Checks a complete record (frame and body) without keeping its fields.
pub(crate) fn validate(record: &[u8]) -> Result<(), Bad> {
    let size = frame_size(record)?;
    if (record.len() as u64) < size {
        return Err(Bad::Incomplete { needed: size });
    }
    let body = &record[FRAME_LEN..size as usize];
    let crc = u32::from_le_bytes([record[4], record[5], record[6], record[7]]);
    if crc32c::crc32c(body) != crc {
        return Err(Bad::Invalid("checksum mismatch"));
    }
    let topic_len = u16::from_le_bytes([body[2], body[3]]) as u64;
    let meta_len = u32::from_le_bytes([body[4], body[5], body[6], body[7]]) as u64;
    if topic_len + meta_len > (body.len() - FIXED_LEN) as u64 {
        return Err(Bad::Invalid("field lengths exceed the record"));
    }
    Ok(())
}

/// Decodes the record starting at `offset` in `chunk`, whose first byte is at position `base`.
///
/// The returned entry's fields are zero-copy slices of `chunk`.
pub(crate) fn decode(chunk: &Bytes, offset: usize, base: u64) -> Result<Entry, Bad> {
    let rest = &chunk[offset..];
    validate(rest)?;
    // `validate` has checked every length used below against the buffer.
    let size = frame_size(rest)? as usize;
    let body = offset + FRAME_LEN;
    let topic_len = u16::from_le_bytes([chunk[body + 2], chunk[body + 3]]) as usize;
    let meta_len = u32::from_le_bytes([
        chunk[body + 4],
        chunk[body + 5],
        chunk[body + 6],
        chunk[body + 7],
    ]) as usize;
    let mut received = [0u8; 8];
    received.copy_from_slice(&chunk[body + 8..body + 16]);
    let topic_at = body + FIXED_LEN;
    let meta_at = topic_at + topic_len;
    let payload_at = meta_at + meta_len;
    let pos = base + offset as u64;
    Ok(Entry {
        pos,
        end: pos + size as u64,
        kind: chunk[body],
        flags: chunk[body + 1],
        received_at: i64::from_le_bytes(received),
        topic: chunk.slice(topic_at..meta_at),
        meta: chunk.slice(meta_at..payload_at),
        payload: chunk.slice(payload_at..offset + size),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample<'a>(topic: &'a [u8], meta: &'a [u8], payload: &'a [u8]) -> Record<'a> {
        Record {
            kind: 3,
            flags: 0x81,
            received_at: -42,
            topic,
            meta,
            payload,
        }
    }

    #[test]
    fn round_trip_keeps_every_field() {
        let mut buf = BytesMut::new();
        let first = Prepared::new(sample(b"a/b", b"m", b"payload")).expect("fits");
        let second = Prepared::new(sample(b"", b"", b"")).expect("fits");
        first.encode_into(&mut buf);
        second.encode_into(&mut buf);
        assert_eq!(buf.len() as u64, first.size() + second.size());
        let chunk = buf.freeze();
        let a = decode(&chunk, 0, 100).expect("valid");
        assert_eq!((a.pos, a.end), (100, 100 + first.size()));
        assert_eq!((a.kind, a.flags, a.received_at), (3, 0x81, -42));
        assert_eq!(
            (&a.topic[..], &a.meta[..], &a.payload[..]),
            (&b"a/b"[..], &b"m"[..], &b"payload"[..])
        );
        let b = decode(&chunk, first.size() as usize, 100).expect("valid");
        assert_eq!(b.pos, a.end);
        assert_eq!(b.end, 100 + chunk.len() as u64);
        assert!(b.topic.is_empty() && b.meta.is_empty() && b.payload.is_empty());
    }

    #[test]
    fn damage_is_detected() {
        let mut buf = BytesMut::new();
        Prepared::new(sample(b"t", b"", b"hello"))
            .expect("fits")
            .encode_into(&mut buf);
        let good = buf.freeze();
        for i in 0..good.len() {
            let mut bad = good.to_vec();
            bad[i] ^= 0x40;
            assert!(
                decode(&Bytes::from(bad), 0, 0).is_err(),
                "flip at {i} went unnoticed"
            );
        }
        let short = good.slice(..good.len() - 1);
        assert_eq!(
            decode(&short, 0, 0).err(),
            Some(Bad::Incomplete {
                needed: good.len() as u64
            })
        );
        assert_eq!(
            decode(&Bytes::from(vec![0u8; 32]), 0, 0).err(),
            Some(Bad::Empty)
        );
    }

    #[test]
    fn oversized_topic_is_refused() {
        let topic = vec![b'x'; u16::MAX as usize + 1];
        assert!(matches!(
            Prepared::new(sample(&topic, b"", b"")),
            Err(LogError::TooLarge { .. })
        ));
    }
}
