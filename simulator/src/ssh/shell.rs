//! The small subset of POSIX shell word splitting the simulated SSH endpoint understands.
//!
//! A command line is words separated by blanks (space, tab). A word is a run of bare
//! characters (`[A-Za-z0-9_./:=@%+,-]`), single-quoted segments (`'…'`, everything literal up
//! to the next `'`) and backslash escapes (`\'`, so the usual `'\''` spelling of an embedded
//! quote works), in any concatenation: `'it'\''s'` is the word `it's`, `''` the empty word.
//! Anything else (`;`, `|`, `$`, `"`, globs, redirections…) is refused rather than guessed at:
//! a real shell would give it a meaning the simulator does not model.

/// Splits `line` into words, or says why it cannot.
pub(crate) fn split(line: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut current: Option<String> = None;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' => {
                if let Some(word) = current.take() {
                    words.push(word);
                }
            }
            '\'' => {
                let word = current.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(inner) => word.push(inner),
                        None => return Err("unterminated single quote".to_string()),
                    }
                }
            }
            '\\' => match chars.next() {
                Some(escaped) if escaped != '\n' => {
                    current.get_or_insert_with(String::new).push(escaped);
                }
                _ => return Err("a backslash at the end of the line".to_string()),
            },
            c if is_bare(c) => current.get_or_insert_with(String::new).push(c),
            other => {
                return Err(format!(
                    "{other:?} is not supported (only bare words and single quotes)"
                ));
            }
        }
    }
    if let Some(word) = current {
        words.push(word);
    }
    Ok(words)
}

fn is_bare(c: char) -> bool {
    c.is_ascii_alphanumeric() || "_./:=@%+,-".contains(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(line: &str) -> Vec<String> {
        split(line).unwrap_or_else(|e| panic!("{line:?}: {e}"))
    }

    #[test]
    fn bare_words_and_blanks() {
        assert_eq!(
            words("cloud-init status --wait"),
            ["cloud-init", "status", "--wait"]
        );
        assert_eq!(
            words("  cat\t/etc/a_b.c:d=e@f%g+h,i  "),
            ["cat", "/etc/a_b.c:d=e@f%g+h,i"]
        );
        assert!(words("").is_empty());
        assert!(words("   ").is_empty());
    }

    #[test]
    fn single_quotes_keep_everything_literal() {
        assert_eq!(words("cat '/etc/my file'"), ["cat", "/etc/my file"]);
        assert_eq!(
            words("echo '$HOME; rm -rf / | \"x\"'"),
            ["echo", "$HOME; rm -rf / | \"x\""]
        );
        assert_eq!(words("a '' b"), ["a", "", "b"]);
        assert_eq!(words("pre'fix'post"), ["prefixpost"]);
    }

    #[test]
    fn an_embedded_quote_is_written_quote_backslash_quote_quote() {
        assert_eq!(words(r"cat 'it'\''s'"), ["cat", "it's"]);
        // The quoting of a lone `'`: empty quoted, escaped quote, empty quoted.
        assert_eq!(words(r"''\'''"), ["'"]);
        assert_eq!(words(r"x \'y"), ["x", "'y"]);
    }

    #[test]
    fn what_a_shell_would_interpret_is_refused() {
        for line in [
            "cat a; rm b",
            "cat a | b",
            "cat $HOME",
            "cat \"a\"",
            "cat a > b",
            "cat *",
            "cat 'unterminated",
            "cat a\\",
            "cat a\nb",
            "cat ä",
        ] {
            assert!(split(line).is_err(), "{line:?} was accepted");
        }
    }
}
