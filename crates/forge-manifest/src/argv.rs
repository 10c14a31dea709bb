//! Placeholders in a command stage's `run` arguments.
//!
//! `{out}` is the stage's output directory, `{workspace}` the workspace root, `{dep:REF}` the
//! directory of an artifact the stage `needs`, and `{inputs}` every resolved input file: as a
//! whole argument it becomes one argument per file; inside a longer argument (`sh -c "cat
//! {inputs}"`) the files are joined with spaces, each shell-quoted. `{{` and `}}` stand for
//! literal braces.

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Piece {
    Text(String),
    Out,
    Workspace,
    Inputs,
    Dep(String),
}

/// Splits one argument into literal text and placeholders.
pub fn parse_arg(arg: &str) -> Result<Vec<Piece>, String> {
    let mut pieces = Vec::new();
    let mut text = String::new();
    let mut chars = arg.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            '{' if chars.peek().map(|(_, c)| *c) == Some('{') => {
                chars.next();
                text.push('{');
            }
            '}' if chars.peek().map(|(_, c)| *c) == Some('}') => {
                chars.next();
                text.push('}');
            }
            '{' => {
                let rest = &arg[i + 1..];
                let Some(end) = rest.find('}') else {
                    return Err("unclosed `{`: write `{{` for a literal brace".to_string());
                };
                let name = &rest[..end];
                for _ in 0..name.chars().count() + 1 {
                    chars.next();
                }
                if !text.is_empty() {
                    pieces.push(Piece::Text(std::mem::take(&mut text)));
                }
                pieces.push(match name {
                    "out" => Piece::Out,
                    "workspace" => Piece::Workspace,
                    "inputs" => Piece::Inputs,
                    _ => match name.strip_prefix("dep:") {
                        Some(r) if !r.is_empty() => Piece::Dep(r.to_string()),
                        _ => {
                            return Err(format!(
                                "unknown placeholder `{{{name}}}`: use {{out}}, {{workspace}}, {{inputs}} or {{dep:STAGE}}"
                            ));
                        }
                    },
                });
            }
            '}' => return Err("unmatched `}`: write `}}` for a literal brace".to_string()),
            c => text.push(c),
        }
    }
    if !text.is_empty() {
        pieces.push(Piece::Text(text));
    }
    Ok(pieces)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_placeholders_and_escapes() {
        assert_eq!(parse_arg("{out}/a.txt").unwrap(), vec![Piece::Out, Piece::Text("/a.txt".into())]);
        assert_eq!(parse_arg("{{x}}").unwrap(), vec![Piece::Text("{x}".into())]);
        assert_eq!(
            parse_arg("--model={dep:defame:merged}").unwrap(),
            vec![Piece::Text("--model=".into()), Piece::Dep("defame:merged".into())]
        );
        assert_eq!(parse_arg("{inputs}").unwrap(), vec![Piece::Inputs]);
        assert!(parse_arg("{nope}").is_err());
        assert!(parse_arg("{out").is_err());
        assert!(parse_arg("a}").is_err());
        assert_eq!(parse_arg("cat {inputs}").unwrap(), vec![Piece::Text("cat ".into()), Piece::Inputs]);
        assert_eq!(parse_arg("héllo {out}").unwrap(), vec![Piece::Text("héllo ".into()), Piece::Out]);
    }
}
