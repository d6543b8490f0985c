//! Text cleaning: unicode NFKC, control characters and whitespace,
//! de-hyphenation across line ends, and removal of headers and footers
//! that repeat over pages.

use std::collections::HashMap;
use std::sync::OnceLock;

use regex::Regex;
use unicode_normalization::UnicodeNormalization;

/// A page with fewer non-whitespace characters than this after cleaning
/// is reported as needing OCR (scanned or image-only).
pub const MIN_TEXT_CHARS: usize = 16;

/// Normalizes one page's text, keeping line breaks: NFKC (ligatures such
/// as `ﬁ` become `fi`), CR/LF to LF, control and invisible characters
/// dropped (pdfium marks some hyphens with U+0002), runs of spaces to one,
/// lines trimmed, at most one empty line in a row.
pub fn normalize_page(text: &str) -> String {
    let mut buf = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => {
                if chars.peek() == Some(&'\n') {
                    chars.next();
                }
                buf.push('\n');
            }
            // pdfium's marker for a hyphen it synthesized at a line end.
            '\u{2}' => buf.push('-'),
            '\n' | '\u{0B}' | '\u{0C}' | '\u{2028}' | '\u{2029}' | '\u{85}' => buf.push('\n'),
            '\t' => buf.push(' '),
            // soft hyphen, zero-width characters, BOM, noncharacters
            '\u{AD}' | '\u{200B}' | '\u{200C}' | '\u{200D}' | '\u{2060}' | '\u{FEFF}'
            | '\u{FFFE}' | '\u{FFFF}' | '\u{FFFD}' => {}
            c if c.is_control() => {}
            c => buf.push(c),
        }
    }
    let nfkc: String = buf.nfkc().collect();
    let mut out = String::with_capacity(nfkc.len());
    let mut blank_run = 0;
    for line in nfkc.split('\n') {
        let collapsed = collapse_spaces(line);
        if collapsed.is_empty() {
            blank_run += 1;
            if blank_run > 1 || out.is_empty() {
                continue;
            }
        } else {
            blank_run = 0;
        }
        out.push_str(&collapsed);
        out.push('\n');
    }
    while out.ends_with('\n') {
        out.pop();
    }
    out
}

fn collapse_spaces(line: &str) -> String {
    let mut s = String::with_capacity(line.len());
    for word in line.split_whitespace() {
        if !s.is_empty() {
            s.push(' ');
        }
        s.push_str(word);
    }
    s
}

fn hyphen_re() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    // a letter, a hyphen ending the line, the next line starting with a
    // lowercase letter: "exam-\nple" → "example"
    RE.get_or_init(|| Regex::new(r"(\p{L})-\n(\p{Ll})").expect("valid regex"))
}

/// Joins words hyphenated across line ends ("exam-\nple" → "example").
/// Hyphens before an uppercase letter or a digit are kept (names, ranges).
pub fn dehyphenate(text: &str) -> String {
    hyphen_re().replace_all(text, "$1$2").into_owned()
}

/// A line's identity for header/footer matching: lowercase, digits
/// replaced (so "Page 3" and "Page 4" match), whitespace removed.
fn line_key(line: &str) -> String {
    let mut key = String::with_capacity(line.len());
    for c in line.chars().filter(|c| !c.is_whitespace()) {
        if c.is_ascii_digit() {
            if !key.ends_with('#') {
                key.push('#');
            }
        } else {
            key.extend(c.to_lowercase());
        }
    }
    key
}

/// How many lines at the top and at the bottom of a page may be headers or
/// footers.
const EDGE_LINES: usize = 3;

/// Removes lines that repeat at the top or bottom of many pages (running
/// heads, page numbers, copyright footers). A line key must appear in the
/// first or last [`EDGE_LINES`] lines of at least half the pages (and at
/// least 3 pages) to be removed; documents under 3 pages are untouched,
/// and so is a page that would be left empty.
/// Returns the cleaned pages and how many lines were removed.
pub fn remove_headers_footers(pages: &[String]) -> (Vec<String>, usize) {
    let with_text = pages.iter().filter(|p| !p.trim().is_empty()).count();
    if with_text < 3 {
        return (pages.to_vec(), 0);
    }
    let threshold = with_text.div_ceil(2).max(3);
    let mut top: HashMap<String, usize> = HashMap::new();
    let mut bottom: HashMap<String, usize> = HashMap::new();
    for page in pages {
        let lines: Vec<&str> = page.lines().filter(|l| !l.trim().is_empty()).collect();
        let mut seen_top = std::collections::HashSet::new();
        for l in lines.iter().take(EDGE_LINES) {
            let k = line_key(l);
            if !k.is_empty() && seen_top.insert(k.clone()) {
                *top.entry(k).or_default() += 1;
            }
        }
        let mut seen_bottom = std::collections::HashSet::new();
        for l in lines.iter().rev().take(EDGE_LINES) {
            let k = line_key(l);
            if !k.is_empty() && seen_bottom.insert(k.clone()) {
                *bottom.entry(k).or_default() += 1;
            }
        }
    }
    let repeated =
        |map: &HashMap<String, usize>, k: &str| map.get(k).is_some_and(|&n| n >= threshold);
    let mut removed = 0;
    let cleaned = pages
        .iter()
        .map(|page| {
            let lines: Vec<&str> = page.lines().collect();
            let non_empty: Vec<usize> = (0..lines.len())
                .filter(|&i| !lines[i].trim().is_empty())
                .collect();
            let mut drop = vec![false; lines.len()];
            // Strip from the top while lines are repeated headers.
            for &i in non_empty.iter().take(EDGE_LINES) {
                if repeated(&top, &line_key(lines[i])) {
                    drop[i] = true;
                } else {
                    break;
                }
            }
            for &i in non_empty.iter().rev().take(EDGE_LINES) {
                if repeated(&bottom, &line_key(lines[i])) {
                    drop[i] = true;
                } else {
                    break;
                }
            }
            // A page whose every line looks repeated keeps them all: its
            // content is the repetition (e.g. one line per page).
            if non_empty.iter().all(|&i| drop[i]) {
                drop.iter_mut().for_each(|d| *d = false);
            }
            removed += drop.iter().filter(|d| **d).count();
            let kept: Vec<&str> = lines
                .iter()
                .zip(&drop)
                .filter(|(_, d)| !**d)
                .map(|(l, _)| *l)
                .collect();
            kept.join("\n").trim_matches('\n').to_owned()
        })
        .collect();
    (cleaned, removed)
}

/// Non-whitespace characters in a text.
pub fn visible_chars(text: &str) -> usize {
    text.chars().filter(|c| !c.is_whitespace()).count()
}

/// The whole cleaning pipeline for a document's pages: normalize each
/// page, remove repeated headers/footers, then de-hyphenate.
#[derive(Debug, Clone, PartialEq)]
pub struct Cleaned {
    pub pages: Vec<String>,
    pub header_footer_lines_removed: usize,
}

pub fn clean_pages(raw: &[String]) -> Cleaned {
    let normalized: Vec<String> = raw.iter().map(|p| normalize_page(p)).collect();
    let (pages, removed) = remove_headers_footers(&normalized);
    Cleaned {
        pages: pages.iter().map(|p| dehyphenate(p)).collect(),
        header_footer_lines_removed: removed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_ligatures_controls_and_spaces() {
        let raw = "\u{FB01}rst\u{0007}  line\r\n\r\n\r\n\tsecond\u{AD} line \u{200B}";
        assert_eq!(normalize_page(raw), "first line\n\nsecond line");
    }

    #[test]
    fn dehyphenates_only_lowercase_continuations() {
        assert_eq!(dehyphenate("exam-\nple text"), "example text");
        assert_eq!(dehyphenate("Jean-\nPaul"), "Jean-\nPaul");
        assert_eq!(dehyphenate("pages 3-\n5"), "pages 3-\n5");
        // pdfium's U+0002 hyphen marker becomes a hyphen first
        assert_eq!(
            dehyphenate(&normalize_page("infor\u{2}\r\nmation")),
            "information"
        );
    }

    #[test]
    fn removes_running_heads_and_page_numbers() {
        let words = ["alpha", "beta", "gamma", "delta", "epsilon"];
        let pages: Vec<String> = (1..=5)
            .map(|i| {
                let w = words[i - 1];
                format!("My Manual\nAbout {w} here\nmore on {w}\nPage {i} of 5")
            })
            .collect();
        let (cleaned, removed) = remove_headers_footers(&pages);
        assert_eq!(removed, 10);
        assert_eq!(cleaned[2], "About gamma here\nmore on gamma");
    }

    #[test]
    fn pages_made_only_of_repeated_lines_are_kept() {
        let pages: Vec<String> = (0..12).map(|i| format!("Potato {i}")).collect();
        let (cleaned, removed) = remove_headers_footers(&pages);
        assert_eq!(removed, 0);
        assert_eq!(cleaned, pages);
    }

    #[test]
    fn short_documents_are_untouched() {
        let pages = vec!["Head\nbody".to_owned(), "Head\nother".to_owned()];
        assert_eq!(remove_headers_footers(&pages).1, 0);
    }
}
