//! Filename pattern matching for one path component.
//!
//! The host-side shell expands `*.py`-style words itself (WASI commands cannot), so it needs a
//! matcher that behaves like the shell's: `*`, `?`, `[abc]`, `[a-z]`, `[!x]` / `[^x]`, and a
//! backslash escaping the next character. The parser escapes quoted metacharacters with a
//! backslash, which is why escapes must be honoured everywhere, including inside classes.
//!
//! Matching is iterative (the classic two-pointer star algorithm, O(pattern × name) worst case),
//! because patterns come from an untrusted agent and a recursive matcher can be driven into
//! exponential backtracking with inputs like `*a*a*a*a*b`.

/// One compiled pattern element.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Lit(char),
    Any,
    Star,
    /// Inclusive character ranges; a single character `c` is stored as `(c, c)`.
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
}

impl Tok {
    /// Whether this single-character element accepts `c` (`Star` is handled by the matcher loop).
    fn accepts(&self, c: char) -> bool {
        match self {
            Tok::Lit(l) => *l == c,
            Tok::Any => true,
            Tok::Star => false,
            Tok::Class { negated, ranges } => {
                ranges.iter().any(|&(lo, hi)| lo <= c && c <= hi) != *negated
            }
        }
    }
}

/// Returns true if `name` (a single path component) matches `pattern`.
///
/// A name starting with `.` is only matched by a pattern that starts with a literal `.`, so that
/// `*` does not pick up hidden files, as in a default shell.
pub fn matches(pattern: &str, name: &str) -> bool {
    let toks = compile(pattern);
    let name: Vec<char> = name.chars().collect();

    if name.first() == Some(&'.') && toks.first() != Some(&Tok::Lit('.')) {
        return false;
    }

    let (mut p, mut n) = (0usize, 0usize);
    // Position just after the most recent `*` and the name position it is currently assumed to
    // have consumed up to; on mismatch we let that star swallow one more character and retry.
    // Only the latest star ever needs revisiting, which is what keeps this polynomial.
    let mut backtrack: Option<(usize, usize)> = None;
    while n < name.len() {
        match (toks.get(p), name.get(n)) {
            (Some(Tok::Star), _) => {
                p += 1;
                backtrack = Some((p, n));
                continue;
            }
            (Some(tok), Some(&c)) if tok.accepts(c) => {
                p += 1;
                n += 1;
                continue;
            }
            _ => {}
        }
        match backtrack {
            Some((star_p, star_n)) => {
                p = star_p;
                n = star_n + 1;
                backtrack = Some((star_p, n));
            }
            None => return false,
        }
    }
    // The name is used up; only trailing stars may remain in the pattern.
    toks.get(p..)
        .is_some_and(|rest| rest.iter().all(|t| *t == Tok::Star))
}

/// Returns true if `pattern` contains an unescaped `*`, `?` or `[`, i.e. it needs expanding.
pub fn has_magic(pattern: &str) -> bool {
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                // The escaped character is literal, whatever it is.
                chars.next();
            }
            '*' | '?' | '[' => return true,
            _ => {}
        }
    }
    false
}

/// Removes glob escapes: the literal text a pattern stands for.
///
/// A shell passes a pattern that matches nothing through unchanged (minus quoting), so the
/// executor needs the unescaped form of a glob word's text for that fallback.
pub fn unescape(pattern: &str) -> String {
    let mut out = String::with_capacity(pattern.len());
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            // A trailing lone backslash stands for itself.
            out.push(chars.next().unwrap_or('\\'));
        } else {
            out.push(c);
        }
    }
    out
}

fn compile(pattern: &str) -> Vec<Tok> {
    let chars: Vec<char> = pattern.chars().collect();
    let mut out = Vec::with_capacity(chars.len());
    let mut i = 0;
    while let Some(&c) = chars.get(i) {
        match c {
            '\\' => match chars.get(i + 1) {
                Some(&next) => {
                    out.push(Tok::Lit(next));
                    i += 2;
                }
                None => {
                    out.push(Tok::Lit('\\'));
                    i += 1;
                }
            },
            '*' => {
                // Consecutive stars are equivalent to one; collapsing keeps the loop simple.
                if out.last() != Some(&Tok::Star) {
                    out.push(Tok::Star);
                }
                i += 1;
            }
            '?' => {
                out.push(Tok::Any);
                i += 1;
            }
            '[' => match parse_class(&chars, i) {
                Some((tok, next)) => {
                    out.push(tok);
                    i = next;
                }
                None => {
                    // An unclosed class is not an error in a shell: the `[` is just a character.
                    out.push(Tok::Lit('['));
                    i += 1;
                }
            },
            _ => {
                out.push(Tok::Lit(c));
                i += 1;
            }
        }
    }
    out
}

/// Parses a bracket expression starting at `chars[open] == '['`. Returns the class and the index
/// just past its closing `]`, or `None` if it is not closed.
fn parse_class(chars: &[char], open: usize) -> Option<(Tok, usize)> {
    let mut i = open + 1;
    let negated = matches!(chars.get(i), Some('!' | '^'));
    if negated {
        i += 1;
    }
    let mut ranges = Vec::new();
    // A `]` right after `[` or `[!` is a member, not the end (POSIX), so `[]]` matches `]`.
    let mut first = true;
    loop {
        let mut lo = *chars.get(i)?;
        if lo == ']' && !first {
            return Some((Tok::Class { negated, ranges }, i + 1));
        }
        first = false;
        if lo == '\\' {
            lo = *chars.get(i + 1)?;
            i += 2;
        } else {
            i += 1;
        }
        // `a-z` is a range unless the `-` is last (`[a-]` holds `a` and `-`).
        let is_range = chars.get(i) == Some(&'-') && chars.get(i + 1).is_some_and(|&c| c != ']');
        if is_range {
            let mut hi = *chars.get(i + 1)?;
            if hi == '\\' {
                hi = *chars.get(i + 2)?;
                i += 3;
            } else {
                i += 2;
            }
            // A reversed range such as `z-a` simply matches nothing, as in bash.
            ranges.push((lo, hi));
        } else {
            ranges.push((lo, lo));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals() {
        assert!(matches("foo.txt", "foo.txt"));
        assert!(!matches("foo.txt", "foo.txz"));
        assert!(!matches("foo", "foobar"));
        assert!(!matches("foobar", "foo"));
        assert!(matches("", ""));
        assert!(!matches("", "a"));
    }

    #[test]
    fn star() {
        assert!(matches("*", "anything"));
        assert!(matches("*", ""));
        assert!(matches("*.py", "train.py"));
        assert!(!matches("*.py", ".py.py"));
        assert!(!matches("*.py", "train.pyc"));
        assert!(matches("a*b*c", "aXXbYYc"));
        assert!(matches("a*b*c", "abc"));
        assert!(!matches("a*b*c", "aXXbYY"));
        assert!(matches("**", "x"));
        assert!(matches("a*", "a"));
        assert!(matches("*a", "aaa"));
        assert!(matches("*ab", "aab"));
        assert!(!matches("*ab", "aba"));
    }

    #[test]
    fn question_mark() {
        assert!(matches("?", "a"));
        assert!(!matches("?", ""));
        assert!(!matches("?", "ab"));
        assert!(matches("f??.rs", "foo.rs"));
        assert!(matches("?é", "xé"));
    }

    #[test]
    fn classes() {
        assert!(matches("[abc]", "b"));
        assert!(!matches("[abc]", "d"));
        assert!(matches("[a-z]x", "qx"));
        assert!(!matches("[a-z]", "Q"));
        assert!(matches("[!x]", "y"));
        assert!(!matches("[!x]", "x"));
        assert!(matches("[^x]", "y"));
        assert!(!matches("[^x]", "x"));
        assert!(matches("[]]", "]"));
        assert!(matches("[!]]", "a"));
        assert!(!matches("[!]]", "]"));
        assert!(matches("[a-]", "-"));
        assert!(matches("[a-]", "a"));
        assert!(!matches("[z-a]", "m"));
        assert!(matches("file[0-9][0-9].txt", "file42.txt"));
        assert!(matches("[\\]]", "]"));
        assert!(matches("[\\-a]", "-"));
        assert!(matches("[a\\-z]", "-"));
        assert!(!matches("[a\\-z]", "m"));
        assert!(matches("[\\!a]", "!"));
    }

    #[test]
    fn malformed_classes_are_literal() {
        assert!(matches("[", "["));
        assert!(matches("a[b", "a[b"));
        assert!(!matches("a[b", "ab"));
        assert!(matches("[!", "[!"));
        assert!(matches("[]", "[]"));
        assert!(matches("[a-", "[a-"));
        assert!(matches("[\\", "[\\"));
        assert!(matches("*[", "x["));
    }

    #[test]
    fn escapes() {
        assert!(matches("\\*", "*"));
        assert!(!matches("\\*", "a"));
        assert!(matches("a\\?b", "a?b"));
        assert!(!matches("a\\?b", "axb"));
        assert!(matches("\\[x]", "[x]"));
        assert!(matches("x\\", "x\\"));
        assert!(matches("\\\\", "\\"));
    }

    #[test]
    fn hidden_files() {
        assert!(!matches("*", ".git"));
        assert!(!matches("?git", ".git"));
        assert!(!matches("[.]git", ".git"));
        assert!(matches(".*", ".git"));
        assert!(matches(".g*", ".git"));
        assert!(matches("\\.git", ".git"));
        assert!(matches("*.git", "x.git"));
        assert!(matches("a*", "a.b"));
    }

    #[test]
    fn no_exponential_blowup() {
        let name = "a".repeat(5000);
        let pattern = format!("{}b", "*a".repeat(50));
        assert!(!matches(&pattern, &name));
        assert!(matches(&"*a".repeat(50), &name));
    }

    #[test]
    fn magic() {
        assert!(has_magic("*.rs"));
        assert!(has_magic("a?"));
        assert!(has_magic("[ab]"));
        assert!(!has_magic("plain"));
        assert!(!has_magic("\\*"));
        assert!(!has_magic("a\\[b\\?"));
        assert!(has_magic("\\\\*"));
        assert!(!has_magic("trailing\\"));
    }

    #[test]
    fn unescape_removes_escapes() {
        assert_eq!(unescape("a\\*b"), "a*b");
        assert_eq!(unescape("\\\\"), "\\");
        assert_eq!(unescape("x\\"), "x\\");
        assert_eq!(unescape("plain*"), "plain*");
    }

    /// Deterministic xorshift so failures reproduce without a dependency on `rand`.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn string(&mut self, alphabet: &[char], max_len: u64) -> String {
            let len = self.next() % (max_len + 1);
            (0..len)
                .map(|_| alphabet[(self.next() % alphabet.len() as u64) as usize])
                .collect()
        }
    }

    #[test]
    fn fuzz_never_panics() {
        let alphabet: Vec<char> = "ab.*?[]!^-\\é".chars().collect();
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for _ in 0..20_000 {
            let pattern = rng.string(&alphabet, 12);
            let name = rng.string(&alphabet, 12);
            let _ = matches(&pattern, &name);
            let _ = has_magic(&pattern);
            // A pattern with no magic matches exactly its unescaped text (unless hidden-file
            // rules apply, which only affect wildcards).
            if !has_magic(&pattern) {
                assert!(matches(&pattern, &unescape(&pattern)), "{pattern:?}");
            }
        }
    }
}
