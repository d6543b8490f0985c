//! Chunking by tokens of the embedding model's tokenizer, each chunk
//! keeping the pages it spans.

use tokenizers::Tokenizer;

/// One window of tokens over the document.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunk {
    pub index: usize,
    /// First and last page (1-based) the chunk's text comes from.
    pub page_start: usize,
    pub page_end: usize,
    /// The chunk's text, cut from the cleaned pages at token boundaries
    /// (pages joined with a newline).
    pub text: String,
    /// The tokenizer's ids for the text, without `[CLS]`/`[SEP]`.
    pub ids: Vec<u32>,
}

/// Window size and overlap, in tokens (special tokens not counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkSpec {
    pub size: usize,
    pub overlap: usize,
}

impl Default for ChunkSpec {
    /// 254 content tokens + `[CLS]` + `[SEP]` = the model's 256-token
    /// maximum; 32 tokens of overlap.
    fn default() -> Self {
        Self {
            size: 254,
            overlap: 32,
        }
    }
}

impl ChunkSpec {
    pub fn validate(&self, max_size: usize) -> Result<(), String> {
        if self.size == 0 || self.size > max_size {
            return Err(format!(
                "chunk_tokens must be between 1 and {max_size}, got {}",
                self.size
            ));
        }
        if self.overlap >= self.size {
            return Err(format!(
                "chunk_overlap ({}) must be smaller than chunk_tokens ({})",
                self.overlap, self.size
            ));
        }
        Ok(())
    }
}

struct Tok {
    page: usize, // index into pages
    id: u32,
    start: usize, // byte offsets into the page's text
    end: usize,
}

/// Splits `pages` (cleaned text, index 0 = page 1) into token windows.
/// Windows start every `size - overlap` tokens; the last one ends at the
/// document's last token. Pages with no tokens contribute nothing.
pub fn chunk_pages(
    tokenizer: &Tokenizer,
    pages: &[String],
    spec: ChunkSpec,
) -> Result<Vec<Chunk>, String> {
    spec.validate(usize::MAX)?;
    let mut toks: Vec<Tok> = Vec::new();
    for (page, text) in pages.iter().enumerate() {
        if text.trim().is_empty() {
            continue;
        }
        let enc = tokenizer
            .encode(text.as_str(), false)
            .map_err(|e| format!("tokenizer failed on page {}: {e}", page + 1))?;
        for (&id, &(start, end)) in enc.get_ids().iter().zip(enc.get_offsets()) {
            toks.push(Tok {
                page,
                id,
                start,
                end,
            });
        }
    }
    let mut chunks = Vec::new();
    if toks.is_empty() {
        return Ok(chunks);
    }
    let step = spec.size - spec.overlap;
    let mut begin = 0;
    loop {
        let end = (begin + spec.size).min(toks.len());
        let window = &toks[begin..end];
        chunks.push(Chunk {
            index: chunks.len(),
            page_start: window[0].page + 1,
            page_end: window[window.len() - 1].page + 1,
            text: window_text(pages, window),
            ids: window.iter().map(|t| t.id).collect(),
        });
        if end == toks.len() {
            break;
        }
        begin += step;
    }
    Ok(chunks)
}

fn window_text(pages: &[String], window: &[Tok]) -> String {
    let mut parts: Vec<&str> = Vec::new();
    let mut i = 0;
    while i < window.len() {
        let page = window[i].page;
        let mut j = i;
        while j + 1 < window.len() && window[j + 1].page == page {
            j += 1;
        }
        let text = &pages[page];
        let (start, end) = (window[i].start, window[j].end.max(window[i].start));
        parts.push(text.get(start..end).unwrap_or(""));
        i = j + 1;
    }
    parts.join("\n")
}
