//! Bounds on what a manifest file may be, checked before the KDL parser sees it.
//!
//! The KDL parser, the decoders and the lore tree are recursive, so a file nested thousands of
//! levels deep (valid KDL or not) would overflow the stack. [`nesting`] finds the first block
//! that goes deeper than [`MAX_NESTING`] with a linear lexical scan, so such a file gets a
//! diagnostic at the offending `{` instead of an abort.

/// How deep `{ ... }` blocks may nest. The deepest construct forge itself needs is a few levels
/// (`model { adapter { target-modules ... } }`); lore trees get about half of this each way
/// (`list { item { list { ... } } }` is two levels per generation).
pub const MAX_NESTING: usize = 64;

/// The largest manifest file forge reads (spans are 32-bit offsets).
pub const MAX_FILE_BYTES: u64 = 256 << 20;

/// The most `{` a file may hold. The KDL parser recovers from a syntax error by resuming at a
/// later token, and from there it may read braces that [`nesting`] saw inside strings as
/// blocks: the depth it can reach is bounded only by the number of `{` in the file. It runs on
/// a thread whose stack covers that bound ([`parser_stack`]), so no file can overflow it.
pub const MAX_BLOCKS: usize = 100_000;

/// The stack the KDL parser gets for a file with `blocks` braces: measured, the parser's error
/// recovery takes under 16 KiB per level; this allows 32 KiB. (Untouched stack pages cost
/// nothing: a valid file, at most [`MAX_NESTING`] deep, uses a few hundred KiB of it.)
pub fn parser_stack(blocks: usize) -> usize {
    (16 << 20) + blocks.min(MAX_BLOCKS) * (32 << 10)
}

/// The byte offset of the first `{` that opens a block deeper than [`MAX_NESTING`], if any.
///
/// Strings (quoted, multi-line and raw), line comments and (nested) block comments are skipped,
/// so braces inside them do not count. An unterminated string or comment ends the scan: the
/// parser reports it.
pub fn nesting(text: &str) -> Option<usize> {
    let b = text.as_bytes();
    let mut depth = 0usize;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'{' => {
                depth += 1;
                if depth > MAX_NESTING {
                    return Some(i);
                }
                i += 1;
            }
            b'}' => {
                depth = depth.saturating_sub(1);
                i += 1;
            }
            b'/' if b.get(i + 1) == Some(&b'/') => {
                i = memchr(b'\n', b, i).unwrap_or(b.len());
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i = block_comment_end(b, i)?;
            }
            b'"' => {
                i = quoted_end(b, i)?;
            }
            b'#' if b.get(i + 1).is_some_and(|&c| c == b'#' || c == b'"') => {
                i = raw_end(b, i)?;
            }
            _ => i += 1,
        }
    }
    None
}

fn memchr(needle: u8, b: &[u8], from: usize) -> Option<usize> {
    b[from..].iter().position(|&c| c == needle).map(|p| from + p)
}

/// After `/* ... */` starting at `i`; block comments nest in KDL.
fn block_comment_end(b: &[u8], mut i: usize) -> Option<usize> {
    let mut level = 0usize;
    while i + 1 < b.len() {
        match (b[i], b[i + 1]) {
            (b'/', b'*') => {
                level += 1;
                i += 2;
            }
            (b'*', b'/') => {
                level -= 1;
                i += 2;
                if level == 0 {
                    return Some(i);
                }
            }
            _ => i += 1,
        }
    }
    None
}

/// After a quoted string (`"..."` or `"""..."""`) starting at `i`; `\` escapes one character.
fn quoted_end(b: &[u8], i: usize) -> Option<usize> {
    let multi = b[i..].starts_with(b"\"\"\"");
    let mut j = i + if multi { 3 } else { 1 };
    while j < b.len() {
        match b[j] {
            b'\\' => j += 2,
            b'"' if !multi => return Some(j + 1),
            b'"' if b[j..].starts_with(b"\"\"\"") => return Some(j + 3),
            _ => j += 1,
        }
    }
    None
}

/// After a raw string (`#"..."#`, `##"""..."""##`, ...) starting at `i`: no escapes; it ends at
/// the first `"` followed by as many `#` as opened it.
fn raw_end(b: &[u8], i: usize) -> Option<usize> {
    let hashes = b[i..].iter().take_while(|&&c| c == b'#').count();
    let mut j = i + hashes;
    if b.get(j) != Some(&b'"') {
        return Some(j); // not a raw string after all (`#true`, `#null`, ...)
    }
    j += 1;
    while j < b.len() {
        if b[j] == b'"' && b.len() - (j + 1) >= hashes && b[j + 1..j + 1 + hashes].iter().all(|&c| c == b'#') {
            return Some(j + 1 + hashes);
        }
        j += 1;
    }
    None
}

/// The byte offset, line and column (1-based, in characters) where `bytes` stops being UTF-8.
pub fn utf8_error(bytes: &[u8]) -> Option<(usize, usize, usize)> {
    let e = std::str::from_utf8(bytes).err()?;
    let at = e.valid_up_to();
    // Everything before `at` is valid UTF-8.
    let before = std::str::from_utf8(&bytes[..at]).unwrap_or_default();
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map(|l| l.chars().count()).unwrap_or(0) + 1;
    Some((at, line, column))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deep_blocks_are_found_and_strings_and_comments_are_skipped() {
        let deep = "a ".to_string() + &"{ b ".repeat(MAX_NESTING + 1) + &"}".repeat(MAX_NESTING + 1);
        let at = nesting(&deep).expect("too deep");
        assert_eq!(&deep[at..at + 1], "{");
        assert_eq!(deep[..at].matches('{').count(), MAX_NESTING);

        let ok = "a ".to_string() + &"{ b ".repeat(MAX_NESTING) + &"}".repeat(MAX_NESTING);
        assert_eq!(nesting(&ok), None);

        let braces = "{".repeat(MAX_NESTING + 10);
        for hidden in [
            format!("a \"{braces}\""),
            format!("a \"\"\"\n{braces}\n\"\"\""),
            format!("a #\"{braces}\"#"),
            format!("a ##\"\"#{braces}\"##"),
            format!("a \"\\\"{braces}\""),
            format!("// {braces}\na"),
            format!("/* /* */ {braces} */ a"),
        ] {
            assert_eq!(nesting(&hidden), None, "{hidden}");
        }
        assert!(nesting(&format!("a #true {braces}")).is_some());
    }

    #[test]
    fn utf8_errors_have_a_line_and_column() {
        assert_eq!(utf8_error(b"ok"), None);
        assert_eq!(utf8_error(b"forge 1\nlist \"\xff\""), Some((14, 2, 7)));
        assert_eq!(utf8_error(b"\xc3\xa9\n\xc3\xa9x\xc3"), Some((6, 2, 3)));
    }
}
