//! Parser for the command lines given to the `bash` tool.
//!
//! WASI preview 1 has no processes, so there is no real shell to hand the line to: the host parses
//! it and runs each pipeline stage as a WASM command. We accept a deliberately small POSIX subset
//! (words, quoting, pipes, `&&`/`||`/`;`, `!`, file redirections and `N>&M`) and reject everything
//! else with an explicit error. Refusing is better than approximating: an agent told "variables
//! are not supported" rephrases, while one whose `$HOME` silently stays literal goes astray.
//!
//! Parsing is pure and bounded (input size, command and word counts), and must never panic,
//! since the input comes straight from a model.

use thiserror::Error;

/// Longest accepted command line, in bytes.
pub const MAX_INPUT_BYTES: usize = 64 * 1024;
/// Most commands (pipeline stages) in one script, counted over all pipelines.
pub const MAX_COMMANDS: usize = 1024;
/// Most words in one command (redirections are bounded by the same number separately).
pub const MAX_WORDS_PER_COMMAND: usize = 4096;

/// A whole command line: and-or lists separated by `;` or newlines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Script {
    pub items: Vec<AndOrList>,
}

/// Pipelines joined by `&&` / `||`, evaluated left to right with equal precedence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AndOrList {
    pub first: Pipeline,
    pub rest: Vec<(Connector, Pipeline)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Connector {
    /// `&&`
    And,
    /// `||`
    Or,
}

/// Commands joined by `|`; `negated` is set by a leading `!`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pipeline {
    pub negated: bool,
    pub commands: Vec<Command>,
}

/// One simple command. `words` is never empty: `words[0]` is the program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub words: Vec<Word>,
    /// In source order, which is the order they must be applied in (`>f 2>&1` differs from
    /// `2>&1 >f`).
    pub redirects: Vec<Redirect>,
}

/// A word after quote removal.
///
/// If `glob` is true the word contained an unquoted `*`, `?` or `[` and `text` is a pattern for
/// [`super::glob::matches`]: characters that were quoted or backslash-escaped in the source and
/// would be special to the matcher are escaped with a backslash. If `glob` is false, `text` is
/// the plain literal value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Word {
    pub text: String,
    pub glob: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    /// The descriptor being redirected: explicit (`2>`) or the operator's default (0 for `<`,
    /// 1 for `>`, `>>` and `>&`).
    pub fd: u32,
    pub op: RedirectOp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedirectOp {
    /// `< file`
    Read(Word),
    /// `> file`
    Write(Word),
    /// `>> file`
    Append(Word),
    /// `N>&M` (and `N<&M`): make `fd` a copy of descriptor M.
    DupTo(u32),
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("syntax error at column {column}: {message}")]
pub struct ParseError {
    /// 1-based position in characters from the start of the input (for a multi-line input this
    /// counts across lines, newlines included).
    pub column: usize,
    pub message: String,
}

const SUBSHELL_MSG: &str =
    "subshells and grouping with `(` `)` are not supported; quote the parenthesis if it is meant literally";
const BACKTICK_MSG: &str =
    "command substitution with backticks is not supported; run the inner command separately";

/// Parses one command line.
pub fn parse(line: &str) -> Result<Script, ParseError> {
    if line.len() > MAX_INPUT_BYTES {
        return Err(ParseError {
            column: 1,
            message: format!(
                "command line is too long ({} bytes; the limit is {MAX_INPUT_BYTES})",
                line.len()
            ),
        });
    }
    let chars: Vec<char> = line.chars().collect();
    let end_col = chars.len() + 1;
    let tokens = Lexer {
        chars,
        pos: 0,
        tokens: Vec::new(),
    }
    .run()?;
    Parser {
        tokens: tokens.into_iter().peekable(),
        end_col,
        commands: 0,
    }
    .script()
}

// ---------------------------------------------------------------------------------------------
// Lexer

#[derive(Debug)]
enum TokKind {
    /// `bare_bang`: the word is exactly an unquoted `!`, which negates at the start of a pipeline.
    Word {
        word: Word,
        bare_bang: bool,
    },
    Pipe,
    OrIf,
    AndIf,
    Semi,
    Newline,
    /// A file redirection; its target is the next token, which must be a word.
    Redir {
        fd: Option<u32>,
        kind: RedirKind,
    },
    Dup {
        fd: Option<u32>,
        target: u32,
        input: bool,
    },
}

#[derive(Debug, Clone, Copy)]
enum RedirKind {
    Read,
    Write,
    Append,
}

impl RedirKind {
    fn symbol(self) -> &'static str {
        match self {
            RedirKind::Read => "<",
            RedirKind::Write => ">",
            RedirKind::Append => ">>",
        }
    }
}

#[derive(Debug)]
struct Token {
    kind: TokKind,
    /// 1-based character column of the token's first character.
    col: usize,
}

/// Accumulates one word in two forms at once, since whether it is a glob is only known at its end.
#[derive(Default)]
struct WordBuf {
    /// Quote-removed literal value.
    plain: String,
    /// Same, with quoted metacharacters backslash-escaped for the glob matcher.
    pattern: String,
    glob: bool,
    /// Any quoting or escaping was used: such a word is never an fd number or a `!` operator.
    quoted: bool,
}

impl WordBuf {
    /// A character that came from quotes or a backslash escape: never special.
    fn push_literal(&mut self, c: char) {
        self.plain.push(c);
        // Escaping more than strictly needed is harmless (the matcher's `\` escapes anything),
        // and covers class syntax (`]`, `-`, `!`, `^`) when the word also has an unquoted `[`.
        if matches!(c, '*' | '?' | '[' | ']' | '\\' | '!' | '^' | '-') {
            self.pattern.push('\\');
        }
        self.pattern.push(c);
    }

    fn push_unquoted(&mut self, c: char) {
        self.plain.push(c);
        self.pattern.push(c);
        if matches!(c, '*' | '?' | '[') {
            self.glob = true;
        }
    }

    fn is_fd_number(&self) -> bool {
        !self.quoted && !self.plain.is_empty() && self.plain.bytes().all(|b| b.is_ascii_digit())
    }

    fn finish(self) -> TokKind {
        let bare_bang = !self.quoted && self.plain == "!";
        let word = if self.glob {
            Word {
                text: self.pattern,
                glob: true,
            }
        } else {
            Word {
                text: self.plain,
                glob: false,
            }
        };
        TokKind::Word { word, bare_bang }
    }
}

/// Characters that end an unquoted word (besides the ones that are errors).
fn is_word_end(c: char) -> bool {
    matches!(
        c,
        ' ' | '\t' | '\r' | '\n' | '|' | '&' | ';' | '<' | '>' | '(' | ')'
    )
}

struct Lexer {
    chars: Vec<char>,
    /// Index into `chars`; the column of `chars[pos]` is `pos + 1`.
    pos: usize,
    tokens: Vec<Token>,
}

impl Lexer {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn peek_at(&self, offset: usize) -> Option<char> {
        self.chars.get(self.pos + offset).copied()
    }

    fn err(pos: usize, message: impl Into<String>) -> ParseError {
        ParseError {
            column: pos + 1,
            message: message.into(),
        }
    }

    fn push(&mut self, kind: TokKind, pos: usize) {
        self.tokens.push(Token { kind, col: pos + 1 });
    }

    fn run(mut self) -> Result<Vec<Token>, ParseError> {
        while let Some(c) = self.peek() {
            let start = self.pos;
            match c {
                // `\r` is treated as a blank so CRLF input behaves like LF input.
                ' ' | '\t' | '\r' => self.pos += 1,
                // Line continuation.
                '\\' if self.peek_at(1) == Some('\n') => self.pos += 2,
                '\n' => {
                    self.pos += 1;
                    self.push(TokKind::Newline, start);
                }
                // Reached only at the start of a word: a `#` inside a word is literal.
                '#' => {
                    while self.peek().is_some_and(|c| c != '\n') {
                        self.pos += 1;
                    }
                }
                '|' => match self.peek_at(1) {
                    Some('|') => {
                        self.pos += 2;
                        self.push(TokKind::OrIf, start);
                    }
                    Some('&') => {
                        return Err(Self::err(
                            start,
                            "`|&` is not supported; use `2>&1 |` to pipe standard error too",
                        ))
                    }
                    _ => {
                        self.pos += 1;
                        self.push(TokKind::Pipe, start);
                    }
                },
                '&' => match self.peek_at(1) {
                    Some('&') => {
                        self.pos += 2;
                        self.push(TokKind::AndIf, start);
                    }
                    Some('>') => {
                        return Err(Self::err(
                            start,
                            "`&>` is not supported; use `>file 2>&1`",
                        ))
                    }
                    _ => {
                        return Err(Self::err(
                            start,
                            "background jobs (`&`) are not supported; use `;` or `&&` to run commands one after another",
                        ))
                    }
                },
                ';' => {
                    self.pos += 1;
                    self.push(TokKind::Semi, start);
                }
                '<' | '>' => self.redirect(None, start)?,
                '(' | ')' => return Err(Self::err(start, SUBSHELL_MSG)),
                _ => self.word(start)?,
            }
        }
        Ok(self.tokens)
    }

    /// Lexes a redirection operator at `self.pos`; `start` is where the token began (an fd
    /// number, if any, precedes the operator).
    fn redirect(&mut self, fd: Option<u32>, start: usize) -> Result<(), ParseError> {
        let op = self.pos;
        let (Some(c), next) = (self.peek(), self.peek_at(1)) else {
            return Err(Self::err(op, "expected a redirection operator"));
        };
        let kind = match (c, next) {
            ('<', Some('<')) => {
                return Err(Self::err(op, "here-documents (`<<`) are not supported; write the text to a file first or pipe it in with `echo`/`printf`"))
            }
            ('<', Some('>')) => {
                return Err(Self::err(op, "`<>` (open for reading and writing) is not supported"))
            }
            ('>', Some('|')) => return Err(Self::err(op, "`>|` is not supported; use `>`")),
            (_, Some('(')) => {
                return Err(Self::err(op, "process substitution is not supported; write to a temporary file instead"))
            }
            (_, Some('&')) => {
                self.pos += 2;
                return self.dup(fd, start, c == '<');
            }
            ('>', Some('>')) => {
                self.pos += 2;
                RedirKind::Append
            }
            ('>', _) => {
                self.pos += 1;
                RedirKind::Write
            }
            _ => {
                self.pos += 1;
                RedirKind::Read
            }
        };
        self.push(TokKind::Redir { fd, kind }, start);
        Ok(())
    }

    /// Lexes the descriptor after `>&` / `<&` (already consumed).
    fn dup(&mut self, fd: Option<u32>, start: usize, input: bool) -> Result<(), ParseError> {
        let op = if input { "<&" } else { ">&" };
        while matches!(self.peek(), Some(' ' | '\t')) {
            self.pos += 1;
        }
        let digits_start = self.pos;
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.pos += 1;
        }
        if self.pos == digits_start {
            return Err(if self.peek() == Some('-') {
                Self::err(
                    self.pos,
                    format!("closing a file descriptor with `{op}-` is not supported"),
                )
            } else {
                Self::err(
                    start,
                    format!("expected a file descriptor number after `{op}`; to send both standard output and standard error to a file use `>file 2>&1`"),
                )
            });
        }
        if self.peek().is_some_and(|c| !is_word_end(c)) {
            return Err(Self::err(
                digits_start,
                format!("expected a file descriptor number after `{op}`"),
            ));
        }
        let digits: String = self
            .chars
            .get(digits_start..self.pos)
            .unwrap_or_default()
            .iter()
            .collect();
        let target = parse_fd(&digits, digits_start)?;
        self.push(TokKind::Dup { fd, target, input }, start);
        Ok(())
    }

    fn word(&mut self, start: usize) -> Result<(), ParseError> {
        let mut w = WordBuf::default();
        while let Some(c) = self.peek() {
            match c {
                '<' | '>' if w.is_fd_number() => {
                    let fd = parse_fd(&w.plain, start)?;
                    return self.redirect(Some(fd), start);
                }
                '(' | ')' => return Err(Self::err(self.pos, SUBSHELL_MSG)),
                c if is_word_end(c) => break,
                '\'' => {
                    let open = self.pos;
                    w.quoted = true;
                    self.pos += 1;
                    loop {
                        match self.peek() {
                            None => return Err(Self::err(open, "unterminated single quote")),
                            Some('\'') => break,
                            Some(c) => w.push_literal(c),
                        }
                        self.pos += 1;
                    }
                    self.pos += 1;
                }
                '"' => self.double_quoted(&mut w)?,
                '\\' => match self.peek_at(1) {
                    Some('\n') => self.pos += 2,
                    Some(next) => {
                        w.quoted = true;
                        w.push_literal(next);
                        self.pos += 2;
                    }
                    // A trailing backslash has nothing to escape; keep it, as `sh -c` does.
                    None => {
                        w.quoted = true;
                        w.push_literal('\\');
                        self.pos += 1;
                    }
                },
                '`' => return Err(Self::err(self.pos, BACKTICK_MSG)),
                '$' => {
                    self.check_dollar(false)?;
                    w.push_unquoted('$');
                    self.pos += 1;
                }
                _ => {
                    w.push_unquoted(c);
                    self.pos += 1;
                }
            }
        }
        self.push(w.finish(), start);
        Ok(())
    }

    fn double_quoted(&mut self, w: &mut WordBuf) -> Result<(), ParseError> {
        let open = self.pos;
        w.quoted = true;
        self.pos += 1;
        loop {
            let Some(c) = self.peek() else {
                return Err(Self::err(open, "unterminated double quote"));
            };
            match c {
                '"' => {
                    self.pos += 1;
                    return Ok(());
                }
                '\\' => match self.peek_at(1) {
                    Some(next @ ('"' | '\\' | '$' | '`')) => {
                        w.push_literal(next);
                        self.pos += 2;
                    }
                    Some('\n') => self.pos += 2,
                    // Elsewhere a backslash in double quotes is an ordinary character.
                    _ => {
                        w.push_literal('\\');
                        self.pos += 1;
                    }
                },
                '`' => return Err(Self::err(self.pos, BACKTICK_MSG)),
                '$' => {
                    self.check_dollar(true)?;
                    w.push_literal('$');
                    self.pos += 1;
                }
                _ => {
                    w.push_literal(c);
                    self.pos += 1;
                }
            }
        }
    }

    /// Rejects any expansion introduced by the `$` at `self.pos`. A `$` that introduces nothing
    /// (followed by a blank, the end, `/`, `.`, a closing quote, ...) is a literal character,
    /// which keeps regexes like `grep 'x$'` and `"end$"` working.
    fn check_dollar(&self, in_double_quotes: bool) -> Result<(), ParseError> {
        let at = self.pos;
        match self.peek_at(1) {
            Some('(') => Err(Self::err(
                at,
                "command substitution `$(...)` is not supported; run the inner command separately and use its output literally",
            )),
            Some('{') => Err(Self::err(
                at,
                "parameter expansion `${...}` is not supported: there are no shell variables; write the value literally",
            )),
            Some(c) if c.is_ascii_alphabetic() || c == '_' => {
                let name: String = self
                    .chars
                    .iter()
                    .skip(at + 1)
                    .take_while(|c| c.is_ascii_alphanumeric() || **c == '_')
                    .take(64)
                    .collect();
                Err(Self::err(
                    at,
                    format!("variable expansion `${name}` is not supported: there are no shell variables; write the value literally, or put it in single quotes if the `$` is meant literally"),
                ))
            }
            Some(c) if c.is_ascii_digit() || matches!(c, '?' | '$' | '#' | '@' | '*' | '!') => {
                Err(Self::err(
                    at,
                    format!("special parameter `${c}` is not supported: there are no shell variables"),
                ))
            }
            Some('\'' | '"') if !in_double_quotes => Err(Self::err(
                at,
                "`$'...'` and `$\"...\"` quoting are not supported; use plain quotes",
            )),
            _ => Ok(()),
        }
    }
}

/// Parses a descriptor number; `pos` is where it starts, for the error.
fn parse_fd(digits: &str, pos: usize) -> Result<u32, ParseError> {
    digits.parse::<u32>().map_err(|_| {
        Lexer::err(
            pos,
            format!("file descriptor number `{digits}` is too large"),
        )
    })
}

// ---------------------------------------------------------------------------------------------
// Parser

struct Parser {
    tokens: std::iter::Peekable<std::vec::IntoIter<Token>>,
    end_col: usize,
    /// Commands parsed so far, for the `MAX_COMMANDS` bound.
    commands: usize,
}

fn err(column: usize, message: impl Into<String>) -> ParseError {
    ParseError {
        column,
        message: message.into(),
    }
}

fn describe(kind: &TokKind) -> &'static str {
    match kind {
        TokKind::Pipe => "`|`",
        TokKind::OrIf => "`||`",
        TokKind::AndIf => "`&&`",
        TokKind::Semi => "`;`",
        TokKind::Newline => "the end of the line",
        TokKind::Word { .. } => "a word",
        TokKind::Redir { .. } | TokKind::Dup { .. } => "a redirection",
    }
}

impl Parser {
    fn skip_newlines(&mut self) {
        while self
            .tokens
            .next_if(|t| matches!(t.kind, TokKind::Newline))
            .is_some()
        {}
    }

    fn is_bang(&mut self) -> bool {
        matches!(
            self.tokens.peek(),
            Some(Token {
                kind: TokKind::Word {
                    bare_bang: true,
                    ..
                },
                ..
            })
        )
    }

    fn script(mut self) -> Result<Script, ParseError> {
        let mut items = Vec::new();
        loop {
            // Blank lines are fine; a `;` with nothing before it is not (as in sh).
            self.skip_newlines();
            match self.tokens.peek() {
                None => break,
                Some(Token {
                    kind: TokKind::Semi,
                    col,
                }) => return Err(err(*col, "expected a command before `;`")),
                Some(_) => {}
            }
            items.push(self.and_or()?);
            match self.tokens.next() {
                None => break,
                Some(Token {
                    kind: TokKind::Semi | TokKind::Newline,
                    ..
                }) => {}
                // `and_or` stops only at a separator or the end; anything else is a bug in this
                // parser, reported rather than panicking.
                Some(t) => {
                    return Err(err(t.col, format!("unexpected {}", describe(&t.kind))));
                }
            }
        }
        Ok(Script { items })
    }

    fn and_or(&mut self) -> Result<AndOrList, ParseError> {
        let first = self.pipeline(None)?;
        let mut rest = Vec::new();
        loop {
            let (connector, symbol) = match self.tokens.peek().map(|t| &t.kind) {
                Some(TokKind::AndIf) => (Connector::And, "&&"),
                Some(TokKind::OrIf) => (Connector::Or, "||"),
                _ => break,
            };
            let col = self.tokens.next().map_or(self.end_col, |t| t.col);
            // Like sh, allow the next pipeline on a following line: `make &&\n make test`.
            self.skip_newlines();
            rest.push((connector, self.pipeline(Some((symbol, col)))?));
        }
        Ok(AndOrList { first, rest })
    }

    /// `after` is the operator that preceded this pipeline, to point errors at it.
    fn pipeline(
        &mut self,
        mut after: Option<(&'static str, usize)>,
    ) -> Result<Pipeline, ParseError> {
        let mut negated = false;
        if self.is_bang() {
            let col = self.tokens.next().map_or(self.end_col, |t| t.col);
            negated = true;
            after = Some(("!", col));
            if self.is_bang() {
                let col = self.tokens.peek().map_or(self.end_col, |t| t.col);
                return Err(err(
                    col,
                    "`!` may appear only once at the start of a pipeline",
                ));
            }
        }
        let mut commands = vec![self.command(after)?];
        while let Some(col) = self
            .tokens
            .next_if(|t| matches!(t.kind, TokKind::Pipe))
            .map(|t| t.col)
        {
            self.skip_newlines();
            if self.is_bang() {
                let col = self.tokens.peek().map_or(self.end_col, |t| t.col);
                return Err(err(
                    col,
                    "`!` negates a whole pipeline and must come before its first command",
                ));
            }
            commands.push(self.command(Some(("|", col)))?);
        }
        Ok(Pipeline { negated, commands })
    }

    fn command(&mut self, after: Option<(&'static str, usize)>) -> Result<Command, ParseError> {
        let start_col = self.tokens.peek().map_or(self.end_col, |t| t.col);
        let mut words = Vec::new();
        let mut redirects = Vec::new();
        while let Some(tok) = self.tokens.next_if(|t| {
            matches!(
                t.kind,
                TokKind::Word { .. } | TokKind::Redir { .. } | TokKind::Dup { .. }
            )
        }) {
            match tok.kind {
                TokKind::Word { word, .. } => {
                    if words.len() >= MAX_WORDS_PER_COMMAND {
                        return Err(err(
                            tok.col,
                            format!("too many words in one command (the limit is {MAX_WORDS_PER_COMMAND})"),
                        ));
                    }
                    words.push(word);
                }
                TokKind::Redir { fd, kind } => {
                    if redirects.len() >= MAX_WORDS_PER_COMMAND {
                        return Err(err(
                            tok.col,
                            format!("too many redirections in one command (the limit is {MAX_WORDS_PER_COMMAND})"),
                        ));
                    }
                    let target = match self
                        .tokens
                        .next_if(|t| matches!(t.kind, TokKind::Word { .. }))
                    {
                        Some(Token {
                            kind: TokKind::Word { word, .. },
                            ..
                        }) => word,
                        _ => {
                            return Err(err(
                                tok.col,
                                format!("missing file name after `{}`", kind.symbol()),
                            ))
                        }
                    };
                    let (default_fd, op) = match kind {
                        RedirKind::Read => (0, RedirectOp::Read(target)),
                        RedirKind::Write => (1, RedirectOp::Write(target)),
                        RedirKind::Append => (1, RedirectOp::Append(target)),
                    };
                    redirects.push(Redirect {
                        fd: fd.unwrap_or(default_fd),
                        op,
                    });
                }
                TokKind::Dup { fd, target, input } => {
                    if redirects.len() >= MAX_WORDS_PER_COMMAND {
                        return Err(err(
                            tok.col,
                            format!("too many redirections in one command (the limit is {MAX_WORDS_PER_COMMAND})"),
                        ));
                    }
                    redirects.push(Redirect {
                        fd: fd.unwrap_or(if input { 0 } else { 1 }),
                        op: RedirectOp::DupTo(target),
                    });
                }
                // Excluded by the `next_if` filter above.
                _ => break,
            }
        }

        if words.is_empty() {
            if !redirects.is_empty() {
                return Err(err(
                    start_col,
                    "a redirection needs a command to run (to create an empty file use e.g. `touch file`)",
                ));
            }
            return Err(match (self.tokens.peek(), after) {
                (Some(t), _) => err(
                    t.col,
                    format!("expected a command before {}", describe(&t.kind)),
                ),
                (None, Some((symbol, col))) => {
                    err(col, format!("expected a command after `{symbol}`"))
                }
                (None, None) => err(self.end_col, "expected a command"),
            });
        }

        self.commands += 1;
        if self.commands > MAX_COMMANDS {
            return Err(err(
                start_col,
                format!("too many commands (the limit is {MAX_COMMANDS})"),
            ));
        }
        Ok(Command { words, redirects })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(text: &str) -> Word {
        Word {
            text: text.to_string(),
            glob: false,
        }
    }

    fn g(text: &str) -> Word {
        Word {
            text: text.to_string(),
            glob: true,
        }
    }

    /// The words of the only command of the only pipeline.
    fn words(line: &str) -> Vec<Word> {
        single(line).words
    }

    fn single(line: &str) -> Command {
        let script = parse(line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
        assert_eq!(script.items.len(), 1, "{line:?}");
        let item = &script.items[0];
        assert!(item.rest.is_empty(), "{line:?}");
        assert_eq!(item.first.commands.len(), 1, "{line:?}");
        item.first.commands[0].clone()
    }

    fn texts(line: &str) -> Vec<String> {
        words(line).into_iter().map(|w| w.text).collect()
    }

    fn error(line: &str) -> ParseError {
        match parse(line) {
            Ok(s) => panic!("{line:?} parsed unexpectedly: {s:?}"),
            Err(e) => e,
        }
    }

    fn assert_error(line: &str, column: usize, needle: &str) {
        let e = error(line);
        // Keep failure messages readable for the multi-kilobyte limit tests.
        let shown: String = line.chars().take(80).collect();
        assert_eq!(e.column, column, "{shown:?}: {e}");
        assert!(e.message.contains(needle), "{shown:?}: {e}");
    }

    fn cmd(ws: &[&str]) -> Command {
        Command {
            words: ws.iter().map(|s| w(s)).collect(),
            redirects: vec![],
        }
    }

    #[test]
    fn empty_inputs() {
        for line in [
            "",
            "   ",
            "\n\n",
            "# just a comment",
            "  # c1\n\t# c2\n",
            "\\\n",
        ] {
            assert_eq!(parse(line), Ok(Script { items: vec![] }), "{line:?}");
        }
    }

    #[test]
    fn simple_words() {
        assert_eq!(texts("ls -la  /tmp\t x"), ["ls", "-la", "/tmp", "x"]);
        assert_eq!(texts("  echo  "), ["echo"]);
        assert_eq!(texts("echo a\r"), ["echo", "a"]);
    }

    #[test]
    fn single_quotes() {
        assert_eq!(texts("echo 'a b'"), ["echo", "a b"]);
        assert_eq!(texts(r"echo 'a\b\'"), ["echo", r"a\b\"]);
        assert_eq!(texts("echo '$HOME `x` \"q\"'"), ["echo", "$HOME `x` \"q\""]);
        assert_eq!(texts("echo 'line1\nline2'"), ["echo", "line1\nline2"]);
    }

    #[test]
    fn double_quotes() {
        assert_eq!(texts(r#"echo "a b""#), ["echo", "a b"]);
        assert_eq!(texts(r#"echo "\" \\ \$ \`""#), ["echo", r#"" \ $ `"#]);
        assert_eq!(texts(r#"echo "\n\t\x""#), ["echo", r"\n\t\x"]);
        assert_eq!(texts(r#"echo "it's""#), ["echo", "it's"]);
        assert_eq!(texts("echo \"a\\\nb\""), ["echo", "ab"]);
    }

    #[test]
    fn backslash_outside_quotes() {
        assert_eq!(texts(r"echo a\ b"), ["echo", "a b"]);
        assert_eq!(texts(r#"echo \'\"\\"#), ["echo", r#"'"\"#]);
        assert_eq!(texts(r"echo \|\;\&\(\)"), ["echo", "|;&()"]);
        assert_eq!(texts("echo a\\\nb"), ["echo", "ab"]);
        assert_eq!(texts("echo \\\n b"), ["echo", "b"]);
        assert_eq!(texts("echo x\\"), ["echo", "x\\"]);
    }

    #[test]
    fn concatenation_and_empty_words() {
        assert_eq!(texts(r#"echo a"b c"'d'"#), ["echo", "ab cd"]);
        assert_eq!(texts("echo '' \"\" x''"), ["echo", "", "", "x"]);
        assert_eq!(words("printf ''"), vec![w("printf"), w("")]);
    }

    #[test]
    fn comments() {
        assert_eq!(texts("echo a # comment | rm -rf /"), ["echo", "a"]);
        assert_eq!(texts("echo a#b"), ["echo", "a#b"]);
        assert_eq!(texts("echo '#x' \\#y"), ["echo", "#x", "#y"]);
        let s = parse("a;# c\nb").unwrap();
        assert_eq!(s.items.len(), 2);
        let s = parse("a # c ; d\nb").unwrap();
        assert_eq!(s.items.len(), 2);
        assert_eq!(s.items[0].first.commands[0], cmd(&["a"]));
    }

    #[test]
    fn glob_words() {
        assert_eq!(words("ls *.py"), vec![w("ls"), g("*.py")]);
        assert_eq!(
            words("ls src/*.py a?c [ab]x"),
            vec![w("ls"), g("src/*.py"), g("a?c"), g("[ab]x")]
        );
        assert_eq!(
            words("ls '*.py' \"a?\" \\[x]"),
            vec![w("ls"), w("*.py"), w("a?"), w("[x]")]
        );
        // Mixed: quoted metacharacters are escaped so the matcher treats them literally.
        assert_eq!(words("ls 'a*'*"), vec![w("ls"), g(r"a\**")]);
        assert_eq!(words(r"ls \?*"), vec![w("ls"), g(r"\?*")]);
        assert_eq!(words(r#"ls "x\\"*"#), vec![w("ls"), g(r"x\\*")]);
        assert_eq!(words("ls ['!']x"), vec![w("ls"), g(r"[\!]x")]);
        // `]`, `!`, `-` alone are not magic.
        assert_eq!(
            words("echo a] ! - ^"),
            vec![w("echo"), w("a]"), w("!"), w("-"), w("^")]
        );
        // Characters the matcher does not care about are not escaped.
        assert_eq!(words("ls 'my file'*"), vec![w("ls"), g("my file*")]);
    }

    #[test]
    fn glob_words_roundtrip_with_matcher() {
        use super::super::glob::matches;
        let word = &words("ls 'a*['*")[1];
        assert!(word.glob);
        assert!(matches(&word.text, "a*[anything"));
        assert!(!matches(&word.text, "abc"));
        let word = &words("ls [a'-'c]")[1];
        assert!(matches(&word.text, "-"));
        assert!(!matches(&word.text, "b"));
    }

    #[test]
    fn pipelines_and_lists() {
        let s = parse("a | b|c && d || e ; f\ng").unwrap();
        assert_eq!(s.items.len(), 3);
        let first = &s.items[0];
        assert_eq!(
            first.first.commands,
            vec![cmd(&["a"]), cmd(&["b"]), cmd(&["c"])]
        );
        assert!(!first.first.negated);
        assert_eq!(first.rest.len(), 2);
        assert_eq!(first.rest[0].0, Connector::And);
        assert_eq!(first.rest[0].1.commands, vec![cmd(&["d"])]);
        assert_eq!(first.rest[1].0, Connector::Or);
        assert_eq!(s.items[1].first.commands, vec![cmd(&["f"])]);
        assert_eq!(s.items[2].first.commands, vec![cmd(&["g"])]);
    }

    #[test]
    fn separators() {
        assert_eq!(parse("a;").unwrap().items.len(), 1);
        assert_eq!(parse("a;\n").unwrap().items.len(), 1);
        assert_eq!(parse("a; b;c").unwrap().items.len(), 3);
        assert_eq!(parse("\n\na\n\n\nb\n").unwrap().items.len(), 2);
        assert_eq!(parse("a\r\nb\r\n").unwrap().items.len(), 2);
    }

    #[test]
    fn newline_after_operators_continues() {
        let s = parse("make &&\n  make test ||\n\n echo fail |\n cat").unwrap();
        assert_eq!(s.items.len(), 1);
        assert_eq!(s.items[0].rest.len(), 2);
        assert_eq!(s.items[0].rest[1].1.commands.len(), 2);
    }

    #[test]
    fn negation() {
        let s = parse("! grep -q x f | wc").unwrap();
        let p = &s.items[0].first;
        assert!(p.negated);
        assert_eq!(
            p.commands,
            vec![cmd(&["grep", "-q", "x", "f"]), cmd(&["wc"])]
        );

        let s = parse("a && ! b").unwrap();
        assert!(!s.items[0].first.negated);
        assert!(s.items[0].rest[0].1.negated);

        // `!` elsewhere, quoted, or glued to a word is literal.
        assert_eq!(texts("echo !"), ["echo", "!"]);
        let s = parse("'!' a").unwrap();
        assert!(!s.items[0].first.negated);
        assert_eq!(s.items[0].first.commands[0], cmd(&["!", "a"]));
        assert_eq!(texts("!a b"), ["!a", "b"]);

        assert_error("! ! a", 3, "only once");
        assert_error("a | ! b", 5, "whole pipeline");
        assert_error("!", 1, "after `!`");
        assert_error("! ; a", 3, "before `;`");
    }

    #[test]
    fn redirections() {
        let c = single("cmd <in >out 2>err.txt");
        assert_eq!(c.words, vec![w("cmd")]);
        assert_eq!(
            c.redirects,
            vec![
                Redirect {
                    fd: 0,
                    op: RedirectOp::Read(w("in"))
                },
                Redirect {
                    fd: 1,
                    op: RedirectOp::Write(w("out"))
                },
                Redirect {
                    fd: 2,
                    op: RedirectOp::Write(w("err.txt"))
                },
            ]
        );

        let c = single("1>>log 0< in cmd a >> 'b c' 2>&1 x");
        assert_eq!(c.words, vec![w("cmd"), w("a"), w("x")]);
        assert_eq!(
            c.redirects,
            vec![
                Redirect {
                    fd: 1,
                    op: RedirectOp::Append(w("log"))
                },
                Redirect {
                    fd: 0,
                    op: RedirectOp::Read(w("in"))
                },
                Redirect {
                    fd: 1,
                    op: RedirectOp::Append(w("b c"))
                },
                Redirect {
                    fd: 2,
                    op: RedirectOp::DupTo(1)
                },
            ]
        );

        let c = single("cmd >&2 1>& 2 3<&0");
        assert_eq!(
            c.redirects,
            vec![
                Redirect {
                    fd: 1,
                    op: RedirectOp::DupTo(2)
                },
                Redirect {
                    fd: 1,
                    op: RedirectOp::DupTo(2)
                },
                Redirect {
                    fd: 3,
                    op: RedirectOp::DupTo(0)
                },
            ]
        );

        // Digits that are not directly before the operator, or quoted, are ordinary words.
        let c = single("echo 2 >f");
        assert_eq!(c.words, vec![w("echo"), w("2")]);
        assert_eq!(
            c.redirects,
            vec![Redirect {
                fd: 1,
                op: RedirectOp::Write(w("f"))
            }]
        );
        let c = single("echo '2'>f a2>g");
        assert_eq!(c.words, vec![w("echo"), w("2"), w("a2")]);
        assert_eq!(c.redirects[0].fd, 1);
        assert_eq!(c.redirects[1].fd, 1);

        // Glob targets are reported as such; expanding them is the executor's business.
        let c = single("cat < *.txt");
        assert_eq!(
            c.redirects,
            vec![Redirect {
                fd: 0,
                op: RedirectOp::Read(g("*.txt"))
            }]
        );
    }

    #[test]
    fn operators_need_no_spaces() {
        let s = parse("a|b>c&&d||e;f<g").unwrap();
        assert_eq!(s.items.len(), 2);
        let l = &s.items[0];
        assert_eq!(l.first.commands.len(), 2);
        assert_eq!(
            l.first.commands[1].redirects,
            vec![Redirect {
                fd: 1,
                op: RedirectOp::Write(w("c"))
            }]
        );
        assert_eq!(l.rest.len(), 2);
        assert_eq!(
            s.items[1].first.commands[0].redirects,
            vec![Redirect {
                fd: 0,
                op: RedirectOp::Read(w("g"))
            }]
        );
    }

    #[test]
    fn realistic_agent_lines() {
        let s = parse(r#"grep -n "def train" src/*.py | head -20 > out.txt && cat out.txt || echo 'none found'"#)
            .unwrap();
        assert_eq!(s.items.len(), 1);
        let l = &s.items[0];
        assert_eq!(l.first.commands.len(), 2);
        assert_eq!(
            l.first.commands[0].words,
            vec![w("grep"), w("-n"), w("def train"), g("src/*.py")]
        );
        assert_eq!(
            l.first.commands[1],
            Command {
                words: vec![w("head"), w("-20")],
                redirects: vec![Redirect {
                    fd: 1,
                    op: RedirectOp::Write(w("out.txt"))
                }],
            }
        );
        assert_eq!(
            l.rest[0],
            (
                Connector::And,
                Pipeline {
                    negated: false,
                    commands: vec![cmd(&["cat", "out.txt"])]
                }
            )
        );
        assert_eq!(
            l.rest[1],
            (
                Connector::Or,
                Pipeline {
                    negated: false,
                    commands: vec![cmd(&["echo", "none found"])]
                }
            )
        );

        let c = single(r#"awk -F, '{print $1, $NF}' data.csv"#);
        assert_eq!(c.words[2], w("{print $1, $NF}"));

        let c = single(r#"sed -i 's/foo$/bar/g; s/\t/ /' "src/main file.rs""#);
        assert_eq!(
            c.words,
            vec![
                w("sed"),
                w("-i"),
                w(r"s/foo$/bar/g; s/\t/ /"),
                w("src/main file.rs")
            ]
        );

        let c = single(r#"grep -rn "TODO\|FIXME" . --include='*.rs' 2>/dev/null"#);
        assert_eq!(c.words[2], w(r"TODO\|FIXME"));
        assert_eq!(c.words[4], w("--include=*.rs"));
        assert_eq!(
            c.redirects,
            vec![Redirect {
                fd: 2,
                op: RedirectOp::Write(w("/dev/null"))
            }]
        );

        let s = parse("cd repo && python -m pytest -x -q tests/ 2>&1 | tail -n 30").unwrap();
        assert_eq!(
            s.items[0].rest[0].1.commands[0].redirects,
            vec![Redirect {
                fd: 2,
                op: RedirectOp::DupTo(1)
            }]
        );

        let c = single(r#"echo "price: 5$" "100 $ " x$ $"#);
        assert_eq!(
            c.words,
            vec![w("echo"), w("price: 5$"), w("100 $ "), w("x$"), w("$")]
        );

        let s = parse("find . -name '*.py' -type f | xargs wc -l | sort -n | tail -5").unwrap();
        assert_eq!(s.items[0].first.commands.len(), 4);
        assert_eq!(s.items[0].first.commands[0].words[3], w("*.py"));
    }

    #[test]
    fn unterminated_quotes() {
        assert_error("echo 'abc", 6, "unterminated single quote");
        assert_error("echo \"abc", 6, "unterminated double quote");
        assert_error("echo \"abc\\\"", 6, "unterminated double quote");
        assert_error("echo a'", 7, "unterminated single quote");
    }

    #[test]
    fn missing_redirect_targets() {
        assert_error("echo >", 6, "missing file name after `>`");
        assert_error("echo > | cat", 6, "missing file name after `>`");
        assert_error("echo 2>> ; x", 6, "missing file name after `>>`");
        assert_error("cat <", 5, "missing file name after `<`");
        assert_error("echo > > f", 6, "missing file name after `>`");
        assert_error("echo >\nf", 6, "missing file name");
    }

    #[test]
    fn empty_commands() {
        assert_error("| a", 1, "expected a command before `|`");
        assert_error("a ||", 3, "expected a command after `||`");
        assert_error("a &&", 3, "expected a command after `&&`");
        assert_error("a |", 3, "expected a command after `|`");
        assert_error("a && && b", 6, "expected a command before `&&`");
        assert_error(";;", 1, "expected a command before `;`");
        assert_error("a;;", 3, "expected a command before `;`");
        assert_error("; a", 1, "expected a command before `;`");
        assert_error("a\n;b", 3, "expected a command before `;`");
        assert_error("a | | b", 5, "expected a command before `|`");
        assert_error("a |;", 4, "expected a command before `;`");
        assert_error("a || \n\n", 3, "expected a command after `||`");
        assert_error(">out", 1, "redirection needs a command");
        assert_error("a && 2>&1", 6, "redirection needs a command");
    }

    #[test]
    fn unsupported_features() {
        assert_error("sleep 1 &", 9, "background jobs");
        assert_error("a & b", 3, "background jobs");
        assert_error("a;&", 3, "background jobs");
        assert_error("a &> f", 3, "`&>`");
        assert_error("a |& b", 3, "`|&`");
        assert_error("echo $(date)", 6, "command substitution");
        assert_error("echo \"$(date)\"", 7, "command substitution");
        assert_error("echo $((1+2))", 6, "command substitution");
        assert_error("echo `date`", 6, "backticks");
        assert_error("echo \"a`date`\"", 8, "backticks");
        assert_error("echo $HOME", 6, "`$HOME`");
        assert_error("echo \"$HOME/x\"", 7, "`$HOME`");
        assert_error("echo a$_x", 7, "`$_x`");
        assert_error("echo ${HOME}", 6, "`${...}`");
        assert_error("echo $?", 6, "`$?`");
        assert_error("echo $1", 6, "`$1`");
        assert_error("echo \"$@\"", 7, "`$@`");
        assert_error("echo $'a\\n'", 6, "quoting are not supported");
        assert_error("(cd x && ls)", 1, "subshells");
        assert_error("a && (b)", 6, "subshells");
        assert_error("echo a)", 7, "subshells");
        assert_error("f() { :; }", 2, "subshells");
        assert_error("cat <<EOF", 5, "here-documents");
        assert_error("cat <<< x", 5, "here-documents");
        assert_error("cat 0<<EOF", 6, "here-documents");
        assert_error("a >| f", 3, "`>|`");
        assert_error("a <> f", 3, "`<>`");
        assert_error("diff <(a) <(b)", 6, "process substitution");
        assert_error("a >&-", 5, "closing");
        assert_error("a >&f", 3, "file descriptor number");
        assert_error("a 2>&1x", 6, "file descriptor number");
        assert_error("a 2>&", 3, "file descriptor number");
        assert_error("a 99999999999>f", 3, "too large");
        assert_error("a 1>&99999999999", 6, "too large");
    }

    #[test]
    fn literal_dollar_and_braces() {
        assert_eq!(
            texts("echo $ a$ '$x' \\$y \"\\$z\""),
            ["echo", "$", "a$", "$x", "$y", "$z"]
        );
        assert_eq!(texts("echo $/ $. $-"), ["echo", "$/", "$.", "$-"]);
        assert_eq!(texts("echo {a,b} { }"), ["echo", "{a,b}", "{", "}"]);
        assert_eq!(texts("echo '(' \\) \"(x)\""), ["echo", "(", ")", "(x)"]);
    }

    #[test]
    fn error_display() {
        let e = error("echo 'x");
        assert_eq!(
            e.to_string(),
            "syntax error at column 6: unterminated single quote"
        );
        let as_dyn: &dyn std::error::Error = &e;
        assert!(as_dyn.source().is_none());
    }

    #[test]
    fn columns_count_chars_not_bytes() {
        assert_error("echo é→ 'x", 9, "unterminated single quote");
        assert_error("é\nà && &&", 8, "before `&&`");
    }

    #[test]
    fn input_length_limit() {
        let line = format!("echo {}", "a".repeat(MAX_INPUT_BYTES));
        assert_error(&line, 1, "too long");
        let exact = format!("echo {}", "a".repeat(MAX_INPUT_BYTES - 5));
        assert!(parse(&exact).is_ok());
    }

    #[test]
    fn command_count_limit() {
        let ok = vec!["a"; MAX_COMMANDS].join("|");
        assert!(parse(&ok).is_ok());
        let too_many = vec!["a"; MAX_COMMANDS + 1].join(";");
        assert_error(&too_many, 2 * MAX_COMMANDS + 1, "too many commands");
    }

    #[test]
    fn word_count_limit() {
        let ok = vec!["a"; MAX_WORDS_PER_COMMAND].join(" ");
        assert_eq!(words(&ok).len(), MAX_WORDS_PER_COMMAND);
        let too_many = vec!["a"; MAX_WORDS_PER_COMMAND + 1].join(" ");
        assert_error(&too_many, 2 * MAX_WORDS_PER_COMMAND + 1, "too many words");
        let redirects = format!("a{}", " >f".repeat(MAX_WORDS_PER_COMMAND + 1));
        assert_error(
            &redirects,
            3 + 3 * MAX_WORDS_PER_COMMAND,
            "too many redirections",
        );
    }

    /// Deterministic xorshift so a failure reproduces without a dependency on `rand`.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    #[test]
    fn fuzz_never_panics() {
        let alphabet: Vec<char> = " \t\n\r|&;<>()!#$`'\"\\*?[]{}-=012a bxé→".chars().collect();
        let mut rng = Rng(0x2545_F491_4F6C_DD1D);
        for _ in 0..20_000 {
            let len = (rng.next() % 40) as usize;
            let line: String = (0..len)
                .map(|_| alphabet[(rng.next() % alphabet.len() as u64) as usize])
                .collect();
            match parse(&line) {
                Ok(script) => {
                    for item in &script.items {
                        for p in
                            std::iter::once(&item.first).chain(item.rest.iter().map(|(_, p)| p))
                        {
                            assert!(!p.commands.is_empty(), "{line:?}");
                            assert!(p.commands.iter().all(|c| !c.words.is_empty()), "{line:?}");
                        }
                    }
                }
                Err(e) => {
                    let max = line.chars().count() + 1;
                    assert!(e.column >= 1 && e.column <= max, "{line:?}: {e}");
                }
            }
        }
    }
}
