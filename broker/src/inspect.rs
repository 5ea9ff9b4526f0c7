//! What an uploaded object really is: its format from its first bytes (magic numbers) checked
//! against the declared content type, and the metadata worth recording (image dimensions, audio
//! duration, log line count). Pure functions over bytes; callers run them off the async threads.

use std::collections::BTreeMap;

use messina_storage::AttrValue;

/// A format Messina recognises by its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Jpeg,
    Png,
    Wav,
    Mp3,
    Ogg,
    Text,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Jpeg => "jpeg",
            Format::Png => "png",
            Format::Wav => "wav",
            Format::Mp3 => "mp3",
            Format::Ogg => "ogg",
            Format::Text => "text",
        }
    }

    /// The format a content type promises; `None` for a type Messina cannot check (one an
    /// operator added to the allowed list), whose bytes are then taken as they are.
    pub fn for_content_type(content_type: &str) -> Option<Format> {
        Some(match content_type {
            "image/jpeg" => Format::Jpeg,
            "image/png" => Format::Png,
            "audio/wav" | "audio/x-wav" | "audio/wave" | "audio/vnd.wave" => Format::Wav,
            "audio/mpeg" | "audio/mp3" => Format::Mp3,
            "audio/ogg" | "application/ogg" => Format::Ogg,
            t if t.starts_with("text/") => Format::Text,
            _ => return None,
        })
    }
}

/// The format the first bytes show, if any.
pub fn sniff(bytes: &[u8]) -> Option<Format> {
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some(Format::Jpeg)
    } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some(Format::Png)
    } else if bytes.len() >= 12 && &bytes[0..4] == b"RIFF" && &bytes[8..12] == b"WAVE" {
        Some(Format::Wav)
    } else if bytes.starts_with(b"OggS") {
        Some(Format::Ogg)
    } else if bytes.starts_with(b"ID3")
        || (bytes.len() >= 2 && bytes[0] == 0xFF && bytes[1] & 0xE0 == 0xE0)
    {
        // An ID3v2 tag, or an MPEG audio frame sync (11 set bits).
        Some(Format::Mp3)
    } else if !bytes.contains(&0) && utf8_so_far(bytes) {
        Some(Format::Text)
    } else {
        None
    }
}

/// Whether `bytes` is UTF-8, allowing a character cut off at the end (a prefix of the object).
fn utf8_so_far(bytes: &[u8]) -> bool {
    match std::str::from_utf8(bytes) {
        Ok(_) => true,
        Err(e) => e.error_len().is_none(),
    }
}

/// How much of the object is read to recognise it; everything past it is streamed from the file.
const PREFIX: usize = 64 * 1024;

/// Checks an object against the declared content type and extracts metadata; the error is a
/// sentence for the device's owner. Memory stays bounded whatever the object's size: the format
/// is recognised from a prefix of at most 64 KiB and the rest is read from `source` as needed
/// (image headers, WAV chunks, every MP3/OGG packet, text line by line).
pub fn inspect_source<S>(
    content_type: &str,
    mut source: S,
    size: u64,
) -> Result<BTreeMap<String, AttrValue>, String>
where
    S: symphonia::core::io::MediaSource + 'static,
{
    use std::io::SeekFrom;
    let mut meta = BTreeMap::new();
    let Some(expected) = Format::for_content_type(content_type) else {
        return Ok(meta);
    };
    let unreadable = |e: std::io::Error| format!("the object cannot be read back: {e}");
    let mut bytes = vec![0; size.min(PREFIX as u64) as usize];
    source.read_exact(&mut bytes).map_err(unreadable)?;
    source.seek(SeekFrom::Start(0)).map_err(unreadable)?;
    let bytes = &bytes[..];
    let found = sniff(bytes);
    if found != Some(expected) {
        return Err(format!(
            "the object is declared {content_type} but its first bytes are {}",
            found.map_or("of no known format".to_string(), |f| format!(
                "those of {}",
                f.as_str()
            ))
        ));
    }
    meta.insert("format".into(), AttrValue::Text(expected.as_str().into()));
    match expected {
        Format::Jpeg | Format::Png => {
            let size =
                imagesize::reader_size(std::io::BufReader::new(&mut source)).map_err(|e| {
                    format!("the {} image has no readable size: {e}", expected.as_str())
                })?;
            meta.insert("width".into(), AttrValue::Int(size.width as i64));
            meta.insert("height".into(), AttrValue::Int(size.height as i64));
        }
        Format::Wav => {
            let wav = wav_header(bytes, size)?;
            meta.insert(
                "sample_rate".into(),
                AttrValue::Int(i64::from(wav.sample_rate)),
            );
            meta.insert("channels".into(), AttrValue::Int(i64::from(wav.channels)));
            meta.insert(
                "bits_per_sample".into(),
                AttrValue::Int(i64::from(wav.bits_per_sample)),
            );
            meta.insert("duration_s".into(), AttrValue::Float(wav.duration_s));
        }
        Format::Mp3 | Format::Ogg => {
            let (duration_s, sample_rate) = compressed_audio(expected, source)?;
            meta.insert("duration_s".into(), AttrValue::Float(duration_s));
            if let Some(rate) = sample_rate {
                meta.insert("sample_rate".into(), AttrValue::Int(i64::from(rate)));
            }
        }
        Format::Text => {
            let lines = text_lines(source)?;
            meta.insert("lines".into(), AttrValue::Int(lines as i64));
        }
    }
    Ok(meta)
}

/// Checks a whole text object chunk by chunk (UTF-8, no NUL) and counts its non-empty lines.
fn text_lines(mut source: impl std::io::Read) -> Result<u64, String> {
    let mut chunk = vec![0; PREFIX];
    // Bytes of a character cut at a chunk's end, carried into the next.
    let mut carry: Vec<u8> = Vec::new();
    let (mut lines, mut in_line) = (0u64, false);
    loop {
        let n = source
            .read(&mut chunk)
            .map_err(|e| format!("the object cannot be read back: {e}"))?;
        let mut piece = std::mem::take(&mut carry);
        piece.extend_from_slice(&chunk[..n]);
        if n == 0 && piece.is_empty() {
            break;
        }
        let valid = match std::str::from_utf8(&piece) {
            Ok(_) => piece.len(),
            Err(e) if e.error_len().is_none() && n > 0 => e.valid_up_to(),
            Err(_) => return Err("the text object is not valid UTF-8".into()),
        };
        for &b in &piece[..valid] {
            match b {
                0 => return Err("the text object contains a NUL byte".into()),
                b'\n' => {
                    lines += u64::from(in_line);
                    in_line = false;
                }
                _ => in_line = true,
            }
        }
        carry = piece[valid..].to_vec();
        if n == 0 {
            break;
        }
    }
    Ok(lines + u64::from(in_line))
}

/// What a WAV file's `fmt ` and `data` chunks say.
#[derive(Debug, PartialEq)]
pub struct WavHeader {
    pub sample_rate: u32,
    pub channels: u16,
    pub bits_per_sample: u16,
    pub duration_s: f64,
}

/// Walks the RIFF chunks of `bytes` (the first bytes of a `size`-byte object) to `fmt ` and
/// `data`; the duration is the data length over the byte rate, rounded to milliseconds.
pub fn wav_header(bytes: &[u8], size: u64) -> Result<WavHeader, String> {
    let u16_at = |i: usize| {
        bytes
            .get(i..i + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |i: usize| {
        bytes
            .get(i..i + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let mut fmt = None;
    let mut at = 12;
    while let (Some(id), Some(len)) = (bytes.get(at..at + 4), u32_at(at + 4)) {
        let body = at + 8;
        match id {
            b"fmt " => {
                let (Some(channels), Some(rate), Some(byte_rate), Some(bits)) = (
                    u16_at(body + 2),
                    u32_at(body + 4),
                    u32_at(body + 8),
                    u16_at(body + 14),
                ) else {
                    return Err("the WAV file's fmt chunk is cut short".into());
                };
                fmt = Some((channels, rate, byte_rate, bits));
            }
            b"data" => {
                let Some((channels, sample_rate, byte_rate, bits_per_sample)) = fmt else {
                    return Err("the WAV file has its data before its fmt chunk".into());
                };
                if byte_rate == 0 {
                    return Err("the WAV file declares a byte rate of 0".into());
                }
                // A streamed WAV may declare more data than it holds; count what is there.
                let data = u64::from(len).min(size.saturating_sub(body as u64));
                let duration_s = (data as f64 / f64::from(byte_rate) * 1000.0).round() / 1000.0;
                return Ok(WavHeader {
                    sample_rate,
                    channels,
                    bits_per_sample,
                    duration_s,
                });
            }
            _ => {}
        }
        // Chunks are padded to an even length.
        at = body + len as usize + (len as usize & 1);
    }
    Err("the WAV file has no data chunk".into())
}

/// Duration (seconds, to the millisecond) and sample rate of MP3 or OGG audio, by reading every
/// packet's duration without decoding.
fn compressed_audio<S>(format: Format, source: S) -> Result<(f64, Option<u32>), String>
where
    S: symphonia::core::io::MediaSource + 'static,
{
    use symphonia::core::errors::Error;
    use symphonia::core::formats::FormatOptions;
    use symphonia::core::io::MediaSourceStream;
    use symphonia::core::meta::MetadataOptions;
    use symphonia::core::probe::Hint;

    let name = format.as_str();
    let stream = MediaSourceStream::new(Box::new(source), Default::default());
    let mut hint = Hint::new();
    hint.with_extension(name);
    let probed = symphonia::default::get_probe()
        .format(
            &hint,
            stream,
            &FormatOptions::default(),
            &MetadataOptions::default(),
        )
        .map_err(|e| format!("the {name} audio does not parse: {e}"))?;
    let mut reader = probed.format;
    let track = reader
        .default_track()
        .ok_or_else(|| format!("the {name} audio has no audio track"))?;
    let (track_id, params) = (track.id, track.codec_params.clone());
    let time_base = params
        .time_base
        .ok_or_else(|| format!("the {name} audio has no time base"))?;
    let mut frames = 0u64;
    loop {
        match reader.next_packet() {
            Ok(p) if p.track_id() == track_id => frames += p.dur,
            Ok(_) => {}
            Err(Error::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(Error::ResetRequired) => break,
            Err(e) => return Err(format!("the {name} audio is damaged: {e}")),
        }
    }
    let frames = params.n_frames.filter(|_| frames == 0).unwrap_or(frames);
    let t = time_base.calc_time(frames);
    let duration_s = ((t.seconds as f64 + t.frac) * 1000.0).round() / 1000.0;
    Ok((duration_s, params.sample_rate))
}

#[cfg(test)]
mod tests {
    /// The same checks over bytes in memory.
    fn inspect(content_type: &str, bytes: &[u8]) -> Result<BTreeMap<String, AttrValue>, String> {
        super::inspect_source(
            content_type,
            std::io::Cursor::new(bytes.to_vec()),
            bytes.len() as u64,
        )
    }

    use super::*;

    fn wav(rate: u32, channels: u16, samples: u32) -> Vec<u8> {
        let block = channels * 2;
        let data = samples * u32::from(block);
        let mut b = Vec::new();
        b.extend_from_slice(b"RIFF");
        b.extend_from_slice(&(36 + data).to_le_bytes());
        b.extend_from_slice(b"WAVEfmt ");
        b.extend_from_slice(&16u32.to_le_bytes());
        b.extend_from_slice(&1u16.to_le_bytes());
        b.extend_from_slice(&channels.to_le_bytes());
        b.extend_from_slice(&rate.to_le_bytes());
        b.extend_from_slice(&(rate * u32::from(block)).to_le_bytes());
        b.extend_from_slice(&block.to_le_bytes());
        b.extend_from_slice(&16u16.to_le_bytes());
        b.extend_from_slice(b"data");
        b.extend_from_slice(&data.to_le_bytes());
        b.resize(b.len() + data as usize, 0);
        b
    }

    #[test]
    fn text_past_the_prefix_is_checked_and_counted_in_chunks() {
        // 100,000 lines of "é…\n" (multi-byte characters straddle every chunk boundary).
        let line = "é€ line\n";
        let text = line.repeat(20_000);
        assert!(text.len() > 3 * PREFIX);
        assert_eq!(
            inspect("text/plain", text.as_bytes()).unwrap()["lines"],
            AttrValue::Int(20_000)
        );
        // A NUL or broken UTF-8 far past the prefix is still found.
        let mut bad = text.clone().into_bytes();
        let at = bad.len() - 2;
        bad[at] = 0;
        assert!(inspect("text/plain", &bad).unwrap_err().contains("NUL"));
        let mut bad = text.into_bytes();
        let at = bad.len() - 2;
        bad[at] = 0xFF;
        assert!(inspect("text/plain", &bad).unwrap_err().contains("UTF-8"));
    }

    #[test]
    fn wav_duration_from_its_header() {
        let meta = inspect("audio/wav", &wav(8000, 1, 12_000)).unwrap();
        assert_eq!(meta["duration_s"], AttrValue::Float(1.5));
        assert_eq!(meta["sample_rate"], AttrValue::Int(8000));
        let meta = inspect("audio/x-wav", &wav(16000, 2, 4000)).unwrap();
        assert_eq!(meta["duration_s"], AttrValue::Float(0.25));
        assert_eq!(meta["channels"], AttrValue::Int(2));
    }

    #[test]
    fn symphonia_reads_the_same_wav_duration() {
        // Cross-checks the hand parse against a real demuxer on the same bytes.
        let (d, rate) =
            compressed_audio(Format::Wav, std::io::Cursor::new(wav(8000, 1, 12_000))).unwrap();
        assert_eq!((d, rate), (1.5, Some(8000)));
    }

    #[test]
    fn a_type_that_lies_is_named() {
        let png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR";
        let e = inspect("image/jpeg", png).unwrap_err();
        assert!(
            e.contains("declared image/jpeg") && e.contains("png"),
            "{e}"
        );
        let e = inspect("audio/mpeg", b"\x00\x01garbage").unwrap_err();
        assert!(e.contains("no known format"), "{e}");
        assert!(inspect("text/plain", b"a\x00b").is_err());
        assert_eq!(
            inspect("text/plain", b"boot ok\nsync 3 files\n").unwrap()["lines"],
            AttrValue::Int(2)
        );
    }

    #[test]
    fn mp3_duration_counts_its_frames() {
        // MPEG-1 Layer III, 128 kbit/s, 44.1 kHz: 417-byte frames of 1152 samples each.
        let mut mp3 = Vec::new();
        for _ in 0..20 {
            let mut frame = vec![0u8; 417];
            frame[..4].copy_from_slice(&[0xFF, 0xFB, 0x90, 0x00]);
            mp3.extend_from_slice(&frame);
        }
        let meta = inspect("audio/mpeg", &mp3).unwrap();
        assert_eq!(meta["format"], AttrValue::Text("mp3".into()));
        // 20 × 1152 / 44100 s.
        assert_eq!(meta["duration_s"], AttrValue::Float(0.522));
        assert_eq!(meta["sample_rate"], AttrValue::Int(44_100));
    }

    #[test]
    fn mp3_frame_sync_and_id3_are_recognised() {
        assert_eq!(sniff(b"ID3\x04\0\0"), Some(Format::Mp3));
        assert_eq!(sniff(&[0xFF, 0xFB, 0x90, 0x00]), Some(Format::Mp3));
        assert_eq!(sniff(b"OggS\0\x02"), Some(Format::Ogg));
        assert_eq!(sniff(&[0xFF, 0xD8, 0xFF, 0xE0]), Some(Format::Jpeg));
    }
}
