//! The decompression guard: refuse a PDF before any backend parses it
//! when one of its Flate streams inflates past a cap.
//!
//! A few hundred KiB of deflated zeros inflate to gigabytes, and PDF
//! backends decode a page's content stream whole in memory, so a small
//! file can take a pool process to its memory cap (where it is killed and
//! the task fails with a generic `MemoryError`) or, without a cap, the
//! host. Backends expose no decode limit, so the guard inflates every
//! stream itself first, into a small scratch buffer that is thrown away:
//! memory stays constant, the cost is one extra inflate pass (a few ms for
//! ordinary files; JPEG and other non-Flate streams are skipped at their
//! first bytes), and the refusal names the stream's size and the cap.
//!
//! Streams are found by the `stream` keyword rather than through the
//! cross-reference table, so damaged files (which backends repair) are
//! guarded too. Encrypted streams do not inflate and are skipped; the
//! per-child memory cap still stands behind them.

use flate2::{Decompress, FlushDecompress, Status};

/// What the guard allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InflateLimits {
    /// Largest inflated size of one stream.
    pub max_stream_bytes: u64,
}

impl Default for InflateLimits {
    fn default() -> Self {
        Self {
            max_stream_bytes: 256 << 20,
        }
    }
}

/// A stream over the cap.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "a compressed stream at byte {offset} ({compressed} bytes) inflates to more than \
     {max} bytes (decompression bomb guard; raise options.max_stream_bytes to accept it)"
)]
pub struct TooMuchInflation {
    pub offset: usize,
    /// Compressed bytes consumed when the cap was passed.
    pub compressed: u64,
    pub max: u64,
}

/// What the guard saw (for tests and timings).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InflateStats {
    pub streams: usize,
    pub inflated_bytes: u64,
}

/// Checks every Flate stream of `pdf` against `limits`.
pub fn check(pdf: &[u8], limits: &InflateLimits) -> Result<InflateStats, TooMuchInflation> {
    let mut stats = InflateStats::default();
    let mut scratch = vec![0u8; 64 << 10];
    let mut pos = 0;
    while let Some(found) = find(&pdf[pos..], b"stream") {
        let keyword = pos + found;
        pos = keyword + b"stream".len();
        if keyword >= 3 && &pdf[keyword - 3..keyword] == b"end" {
            continue;
        }
        // The keyword is followed by CRLF or LF (CR alone in the wild).
        let start = match pdf.get(pos..pos + 2) {
            Some(b"\r\n") => pos + 2,
            Some([b'\n', _]) | Some([b'\r', _]) => pos + 1,
            _ => continue,
        };
        let (consumed, inflated) =
            inflate_len(&pdf[start..], limits.max_stream_bytes, &mut scratch);
        if inflated > limits.max_stream_bytes {
            return Err(TooMuchInflation {
                offset: start,
                compressed: consumed,
                max: limits.max_stream_bytes,
            });
        }
        if inflated > 0 {
            stats.streams += 1;
            stats.inflated_bytes += inflated;
        }
        // Skip the compressed bytes: they may contain "stream" by chance.
        pos = start + consumed as usize;
    }
    Ok(stats)
}

/// Inflates a zlib stream at the start of `data`, stopping at its end,
/// at the first error, or once more than `max` bytes came out. Returns
/// (compressed bytes consumed, inflated bytes).
fn inflate_len(data: &[u8], max: u64, scratch: &mut [u8]) -> (u64, u64) {
    // Not a zlib header (CMF/FLG check): not Flate, nothing to count.
    if data.len() < 2
        || data[0] & 0x0f != 8
        || (u16::from(data[0]) << 8 | u16::from(data[1])) % 31 != 0
    {
        return (0, 0);
    }
    let mut z = Decompress::new(true);
    loop {
        let before_in = z.total_in();
        let before_out = z.total_out();
        let input = &data[before_in as usize..];
        match z.decompress(input, scratch, FlushDecompress::None) {
            Ok(Status::StreamEnd) => break,
            Ok(_) if z.total_out() > max => break,
            // No progress: the input ran out inside the stream.
            Ok(_) if z.total_in() == before_in && z.total_out() == before_out => break,
            Ok(_) => {}
            Err(_) => break,
        }
    }
    (z.total_in(), z.total_out())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::write::ZlibEncoder;
    use flate2::Compression;
    use std::io::Write;

    fn deflate(data: &[u8]) -> Vec<u8> {
        let mut e = ZlibEncoder::new(Vec::new(), Compression::best());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn pdf_with_streams(streams: &[Vec<u8>]) -> Vec<u8> {
        let mut out = b"%PDF-1.7\n".to_vec();
        for (i, s) in streams.iter().enumerate() {
            out.extend_from_slice(
                format!(
                    "{} 0 obj\n<< /Length {} /Filter /FlateDecode >>\nstream\r\n",
                    i + 1,
                    s.len()
                )
                .as_bytes(),
            );
            out.extend_from_slice(s);
            out.extend_from_slice(b"\nendstream\nendobj\n");
        }
        out
    }

    #[test]
    fn ordinary_streams_pass_and_are_counted() {
        let text = b"BT /F1 12 Tf (hello stream endstream) Tj ET ".repeat(1000);
        let pdf = pdf_with_streams(&[deflate(&text), deflate(b"q 1 0 0 1 0 0 cm Q")]);
        let stats = check(&pdf, &InflateLimits::default()).unwrap();
        assert_eq!(stats.streams, 2);
        assert_eq!(stats.inflated_bytes, text.len() as u64 + 18);
    }

    #[test]
    fn a_bomb_is_refused_without_inflating_it_all() {
        let bomb = deflate(&vec![b' '; 64 << 20]);
        assert!(bomb.len() < 256 << 10, "{}", bomb.len());
        let pdf = pdf_with_streams(&[deflate(b"fine"), bomb.clone()]);
        let limits = InflateLimits {
            max_stream_bytes: 8 << 20,
        };
        let err = check(&pdf, &limits).unwrap_err();
        assert_eq!(err.max, 8 << 20);
        assert!(
            err.compressed < bomb.len() as u64 / 4,
            "stopped early: {err:?}"
        );
        assert!(err.to_string().contains("decompression bomb"));
    }

    #[test]
    fn non_flate_and_truncated_streams_are_skipped() {
        let mut truncated = deflate(&b"abc".repeat(10_000));
        truncated.truncate(20);
        let jpeg = vec![0xff, 0xd8, 0xff, 0xe0, 0, 16];
        let pdf = pdf_with_streams(&[jpeg, truncated]);
        let stats = check(&pdf, &InflateLimits::default()).unwrap();
        assert_eq!(
            stats.streams, 1,
            "the truncated stream counts what it inflated"
        );
    }
}
