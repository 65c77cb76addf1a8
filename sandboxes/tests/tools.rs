//! Every default tool on real files, the `bash` tool's shell features, argument validation and
//! the agent-facing tool list.

mod common;

use common::*;
use klong_sandbox::{SandboxError, Termination};
use serde_json::{json, Value};

const TEXT: &str = "hello\nworld\nHello again\nfoo\nbar\nbaz\nqux\nhello end\n";

// ---- edge cases shared by the file tools ---------------------------------------------------

#[test]
fn missing_file_fails_with_the_name_in_stderr() {
    let (_d, mut sb) = default_sandbox();
    for (tool, args) in [
        ("cat", vec!["missing.txt"]),
        ("head", vec!["missing.txt"]),
        ("tail", vec!["missing.txt"]),
        ("wc", vec!["missing.txt"]),
        ("sort", vec!["missing.txt"]),
        ("cut", vec!["-c", "1", "missing.txt"]),
        ("ls", vec!["missing.txt"]),
        ("cp", vec!["missing.txt", "dst.txt"]),
        ("mv", vec!["missing.txt", "dst.txt"]),
        ("rm", vec!["missing.txt"]),
    ] {
        let out = cmd(&mut sb, tool, &args);
        exits(&out, 1);
        assert!(
            out.stderr.contains("missing.txt") && out.stderr.starts_with(tool),
            "{tool}: stderr should name the tool and the file: {:?}",
            out.stderr
        );
        assert!(out.stdout.is_empty(), "{tool}: {:?}", out.stdout);
    }
    // grep's status 2 is "error" (1 means "no match").
    let out = cmd(&mut sb, "grep", &["x", "missing.txt"]);
    assert_eq!(out.exit_code(), Some(2), "{out:?}");
    assert!(out.stderr.contains("missing.txt"), "{:?}", out.stderr);
    for (tool, args) in [
        ("read_file_chunk", json!({"file": "missing.txt"})),
        (
            "search_file",
            json!({"file": "missing.txt", "search_term": "x"}),
        ),
        (
            "replace_in_file",
            json!({"file": "missing.txt", "old": "a", "new": "b"}),
        ),
    ] {
        let out = call(&mut sb, tool, args);
        exits(&out, 1);
        assert_eq!(
            out.stderr,
            format!("{tool}: missing.txt: No such file or directory\n")
        );
    }
    // Nothing was created by the failed calls.
    assert_eq!(ok(cmd(&mut sb, "ls", &[])), "");
}

#[test]
fn empty_file() {
    let (d, mut sb) = default_sandbox();
    write(d.path(), "empty.txt", "");
    assert_eq!(ok(cmd(&mut sb, "cat", &["empty.txt"])), "");
    assert_eq!(ok(cmd(&mut sb, "head", &["empty.txt"])), "");
    assert_eq!(ok(cmd(&mut sb, "tail", &["empty.txt"])), "");
    assert_eq!(ok(cmd(&mut sb, "sort", &["empty.txt"])), "");
    assert_eq!(
        ok(cmd(&mut sb, "wc", &["-l", "empty.txt"])),
        "0 empty.txt\n"
    );
    exits(&cmd(&mut sb, "grep", &["x", "empty.txt"]), 1);
    assert_eq!(
        ok(call(
            &mut sb,
            "read_file_chunk",
            json!({"file": "empty.txt"})
        )),
        "[file is empty]\n"
    );
    let out = call(
        &mut sb,
        "search_file",
        json!({"file": "empty.txt", "search_term": "x"}),
    );
    exits(&out, 1);
    assert_eq!(out.stdout, "[no matches for \"x\"]\n");
}

#[test]
fn binary_content() {
    let (d, mut sb) = default_sandbox();
    let bytes: &[u8] = b"ab\0cd\0\xff\xfe\n\x01tail";
    write(d.path(), "bin.dat", bytes);
    // cat passes every byte through (checked on the host through a redirection, as the
    // outcome's stdout is lossy UTF-8).
    ok(bash(&mut sb, "cat bin.dat > copy.dat"));
    assert_eq!(std::fs::read(d.path().join("copy.dat")).unwrap(), bytes);
    let out = ok(cmd(&mut sb, "cat", &["bin.dat"]));
    assert_eq!(out, String::from_utf8_lossy(bytes));
    assert!(out.contains('\0'));
    assert_eq!(ok(cmd(&mut sb, "wc", &["-c", "bin.dat"])), "14 bin.dat\n");
    assert_eq!(
        ok(call(&mut sb, "read_file_chunk", json!({"file": "bin.dat"}))),
        "[binary file: 14 bytes]\n"
    );
    assert_eq!(
        ok(call(
            &mut sb,
            "search_file",
            json!({"file": "bin.dat", "search_term": "ab"})
        )),
        "[binary file: 14 bytes]\n"
    );
}

#[test]
fn long_lines() {
    let (d, mut sb) = default_sandbox();
    let long = "x".repeat(100_000);
    let content = format!("short\n{long}\nend\n");
    write(d.path(), "long.txt", &content);
    assert_eq!(ok(cmd(&mut sb, "cat", &["long.txt"])), content);
    assert_eq!(
        ok(cmd(&mut sb, "wc", &["long.txt"])),
        "     3      3 100011 long.txt\n"
    );
    assert_eq!(ok(bash(&mut sb, "grep x long.txt | wc -c")), "100001\n");
    let out = ok(call(
        &mut sb,
        "read_file_chunk",
        json!({"file": "long.txt"}),
    ));
    let expected = format!(
        "     1\tshort\n     2\t{}... [line truncated, 100000 bytes]\n     3\tend\n[lines 1-3 of 3]\n",
        "x".repeat(2000)
    );
    assert_eq!(out, expected);
    let out = ok(call(
        &mut sb,
        "search_file",
        json!({"file": "long.txt", "search_term": "xxx", "context_lines": 0}),
    ));
    assert!(
        out.starts_with(&format!(
            "2:{}... [line truncated, 100000 bytes]\n",
            "x".repeat(2000)
        )),
        "{out}"
    );
}

// ---- one tool at a time --------------------------------------------------------------------

#[test]
fn ls_lists_sorted_with_long_and_all() {
    let (d, mut sb) = default_sandbox();
    write(d.path(), "b.txt", "12345");
    write(d.path(), "a.txt", "");
    write(d.path(), ".hidden", "h");
    write(d.path(), "sub/x.txt", "x");
    assert_eq!(ok(cmd(&mut sb, "ls", &[])), "a.txt\nb.txt\nsub\n");
    assert_eq!(
        ok(cmd(&mut sb, "ls", &["-l"])),
        "-          0 a.txt\n-          5 b.txt\nd          - sub/\n"
    );
    assert_eq!(
        ok(cmd(&mut sb, "ls", &["-a"])),
        ".\n..\n.hidden\na.txt\nb.txt\nsub\n"
    );
    assert_eq!(ok(cmd(&mut sb, "ls", &["sub"])), "x.txt\n");
}

#[test]
fn cat_concatenates_files_and_stdin() {
    let (d, mut sb) = default_sandbox();
    write(d.path(), "a", "one\n");
    write(d.path(), "b", "two\n");
    assert_eq!(ok(cmd(&mut sb, "cat", &["a", "b", "a"])), "one\ntwo\none\n");
    assert_eq!(ok(bash(&mut sb, "cat < b")), "two\n");
    assert_eq!(ok(bash(&mut sb, "cat a | cat - b")), "one\ntwo\n");
    // A missing file among others: the rest is still printed, the status says it failed.
    let out = cmd(&mut sb, "cat", &["a", "nope", "b"]);
    exits(&out, 1);
    assert_eq!(out.stdout, "one\ntwo\n");
    assert!(out.stderr.contains("nope"));
}

#[test]
fn head_and_tail() {
    let (d, mut sb) = default_sandbox();
    write(d.path(), "a.txt", TEXT);
    assert_eq!(
        ok(cmd(&mut sb, "head", &["-n", "2", "a.txt"])),
        "hello\nworld\n"
    );
    assert_eq!(
        ok(cmd(&mut sb, "tail", &["-n", "2", "a.txt"])),
        "qux\nhello end\n"
    );
    assert_eq!(
        ok(cmd(&mut sb, "tail", &["-n", "+7", "a.txt"])),
        "qux\nhello end\n"
    );
    assert_eq!(ok(bash(&mut sb, "seq 100 | head -n 3")), "1\n2\n3\n");
    assert_eq!(ok(bash(&mut sb, "seq 100 | tail -n 1")), "100\n");
    // Default: ten lines.
    assert_eq!(ok(bash(&mut sb, "seq 20 | head | wc -l")), "10\n");
    assert_eq!(ok(cmd(&mut sb, "head", &["-n", "100", "a.txt"])), TEXT);
}

#[test]
fn wc_counts() {
    let (d, mut sb) = default_sandbox();
    write(d.path(), "a.txt", TEXT);
    assert_eq!(ok(cmd(&mut sb, "wc", &["-l", "a.txt"])), "8 a.txt\n");
    assert_eq!(ok(cmd(&mut sb, "wc", &["-w", "a.txt"])), "10 a.txt\n");
    assert_eq!(ok(cmd(&mut sb, "wc", &["-c", "a.txt"])), "50 a.txt\n");
    assert_eq!(ok(cmd(&mut sb, "wc", &["a.txt"])), " 8 10 50 a.txt\n");
    assert_eq!(ok(bash(&mut sb, "wc -l < a.txt")), "8\n");
    // A last line without a newline is not counted by -l, as in POSIX wc.
    assert_eq!(ok(bash(&mut sb, "echo -n 'a b' | wc -l")), "0\n");
    assert_eq!(ok(bash(&mut sb, "echo -n 'a b' | wc -w")), "2\n");
}

#[test]
fn grep_options() {
    let (d, mut sb) = default_sandbox();
    write(d.path(), "a.txt", TEXT);
    write(d.path(), "sub/x.txt", "hello in sub\n");
    write(d.path(), "sub/y.txt", "nothing\n");
    assert_eq!(
        ok(cmd(&mut sb, "grep", &["-n", "hello", "a.txt"])),
        "1:hello\n8:hello end\n"
    );
    assert_eq!(
        ok(cmd(&mut sb, "grep", &["-i", "hello", "a.txt"])),
        "hello\nHello again\nhello end\n"
    );
    assert_eq!(
        ok(cmd(&mut sb, "grep", &["-v", "o", "a.txt"])),
        "bar\nbaz\nqux\n"
    );
    assert_eq!(ok(cmd(&mut sb, "grep", &["-c", "hello", "a.txt"])), "2\n");
    assert_eq!(ok(cmd(&mut sb, "grep", &["-ic", "hello", "a.txt"])), "3\n");
    assert_eq!(ok(cmd(&mut sb, "grep", &["^ba.$", "a.txt"])), "bar\nbaz\n");
    // Context: `--` separates groups that do not touch.
    assert_eq!(
        ok(cmd(&mut sb, "grep", &["-A", "1", "foo", "a.txt"])),
        "foo\nbar\n"
    );
    assert_eq!(
        ok(cmd(&mut sb, "grep", &["-n", "-B", "1", "hello", "a.txt"])),
        "1:hello\n--\n7-qux\n8:hello end\n"
    );
    assert_eq!(
        ok(cmd(&mut sb, "grep", &["-C", "1", "world", "a.txt"])),
        "hello\nworld\nHello again\n"
    );
    assert_eq!(
        ok(cmd(
            &mut sb,
            "grep",
            &["-A", "1", "-e", "world", "-e", "baz", "a.txt"]
        )),
        "world\nHello again\n--\nbaz\nqux\n"
    );
    // Recursive, with file names, in sorted order.
    assert_eq!(
        ok(cmd(&mut sb, "grep", &["-r", "hello", "."])),
        "a.txt:hello\na.txt:hello end\nsub/x.txt:hello in sub\n"
    );
    assert_eq!(
        ok(cmd(&mut sb, "grep", &["-r", "hello", "sub"])),
        "sub/x.txt:hello in sub\n"
    );
    // No match: status 1, no output.
    let out = cmd(&mut sb, "grep", &["zzz", "a.txt"]);
    exits(&out, 1);
    assert_eq!(out.stdout, "");
    assert_eq!(ok(bash(&mut sb, "seq 20 | grep 1 | wc -l")), "11\n");
}

#[test]
fn sort_options() {
    let (d, mut sb) = default_sandbox();
    write(d.path(), "nums.txt", "10\n9\n100\n9\n1\n");
    write(d.path(), "pairs.txt", "b 2\na 3\nc 1\nd 10\n");
    assert_eq!(
        ok(cmd(&mut sb, "sort", &["nums.txt"])),
        "1\n10\n100\n9\n9\n"
    );
    assert_eq!(
        ok(cmd(&mut sb, "sort", &["-n", "nums.txt"])),
        "1\n9\n9\n10\n100\n"
    );
    assert_eq!(
        ok(cmd(&mut sb, "sort", &["-r", "nums.txt"])),
        "9\n9\n100\n10\n1\n"
    );
    assert_eq!(
        ok(cmd(&mut sb, "sort", &["-u", "nums.txt"])),
        "1\n10\n100\n9\n"
    );
    assert_eq!(
        ok(cmd(&mut sb, "sort", &["-n", "-r", "-u", "nums.txt"])),
        "100\n10\n9\n1\n"
    );
    assert_eq!(
        ok(cmd(&mut sb, "sort", &["-k", "2", "-n", "pairs.txt"])),
        "c 1\nb 2\na 3\nd 10\n"
    );
    assert_eq!(
        ok(cmd(&mut sb, "sort", &["-k", "2", "pairs.txt"])),
        "c 1\nd 10\nb 2\na 3\n"
    );
    assert_eq!(
        ok(bash(&mut sb, "cat pairs.txt | sort -r")),
        "d 10\nc 1\nb 2\na 3\n"
    );
}

#[test]
fn cut_fields_and_characters() {
    let (d, mut sb) = default_sandbox();
    write(d.path(), "p.txt", "root:x:0:0\nuser:y:1000:1000\n");
    assert_eq!(
        ok(cmd(&mut sb, "cut", &["-d", ":", "-f", "1", "p.txt"])),
        "root\nuser\n"
    );
    assert_eq!(
        ok(cmd(&mut sb, "cut", &["-d:", "-f1,3", "p.txt"])),
        "root:0\nuser:1000\n"
    );
    assert_eq!(
        ok(cmd(&mut sb, "cut", &["-c", "1-3", "p.txt"])),
        "roo\nuse\n"
    );
    assert_eq!(
        ok(bash(&mut sb, "echo 'a b c' | cut -d ' ' -f 2-")),
        "b c\n"
    );
}

#[test]
fn tr_ranges_and_delete() {
    let (d, mut sb) = default_sandbox();
    write(d.path(), "a.txt", "Hello World\n");
    assert_eq!(ok(bash(&mut sb, "tr a-z A-Z < a.txt")), "HELLO WORLD\n");
    assert_eq!(ok(bash(&mut sb, "tr -d lo < a.txt")), "He Wrd\n");
    assert_eq!(
        ok(bash(&mut sb, "cat a.txt | tr ' ' '\\n'")),
        "Hello\nWorld\n"
    );
}

#[test]
fn echo_and_seq() {
    let (_d, mut sb) = default_sandbox();
    assert_eq!(ok(cmd(&mut sb, "echo", &["a", "b c"])), "a b c\n");
    assert_eq!(ok(cmd(&mut sb, "echo", &["-n", "hi"])), "hi");
    assert_eq!(ok(cmd(&mut sb, "echo", &[])), "\n");
    assert_eq!(ok(cmd(&mut sb, "seq", &["3"])), "1\n2\n3\n");
    assert_eq!(ok(cmd(&mut sb, "seq", &["2", "2", "8"])), "2\n4\n6\n8\n");
    assert_eq!(ok(cmd(&mut sb, "seq", &["5", "-1", "3"])), "5\n4\n3\n");
    assert_eq!(ok(cmd(&mut sb, "seq", &["0"])), "");
}

#[test]
fn file_management() {
    let (d, mut sb) = default_sandbox();
    ok(cmd(&mut sb, "mkdir", &["-p", "a/b/c"]));
    assert!(d.path().join("a/b/c").is_dir());
    // mkdir -p of an existing directory is fine; plain mkdir is not.
    ok(cmd(&mut sb, "mkdir", &["-p", "a/b"]));
    let out = cmd(&mut sb, "mkdir", &["a"]);
    exits(&out, 1);
    assert!(out.stderr.contains('a'));

    ok(cmd(&mut sb, "touch", &["a/b/c/f.txt", "t.txt"]));
    assert_eq!(read(d.path(), "t.txt"), "");
    write(d.path(), "src.txt", "payload\n");
    ok(cmd(&mut sb, "cp", &["src.txt", "dst.txt"]));
    assert_eq!(read(d.path(), "dst.txt"), "payload\n");
    // touch of an existing file keeps its contents.
    ok(cmd(&mut sb, "touch", &["dst.txt"]));
    assert_eq!(read(d.path(), "dst.txt"), "payload\n");

    // cp without -r refuses a directory; with -r it copies the tree.
    write(d.path(), "a/b/c/f.txt", "deep\n");
    exits(&cmd(&mut sb, "cp", &["a", "copy"]), 1);
    ok(cmd(&mut sb, "cp", &["-r", "a", "copy"]));
    assert_eq!(read(d.path(), "copy/b/c/f.txt"), "deep\n");
    assert_eq!(read(d.path(), "a/b/c/f.txt"), "deep\n");

    ok(cmd(&mut sb, "mv", &["dst.txt", "moved.txt"]));
    assert!(!d.path().join("dst.txt").exists());
    assert_eq!(read(d.path(), "moved.txt"), "payload\n");
    ok(cmd(&mut sb, "mv", &["moved.txt", "a"]));
    assert_eq!(read(d.path(), "a/moved.txt"), "payload\n");

    // rm without -r refuses a directory; -r removes it; -f ignores missing files.
    exits(&cmd(&mut sb, "rm", &["copy"]), 1);
    assert!(d.path().join("copy").is_dir());
    ok(cmd(&mut sb, "rm", &["-r", "copy"]));
    assert!(!d.path().join("copy").exists());
    ok(cmd(&mut sb, "rm", &["-f", "nothing-here"]));
    ok(cmd(&mut sb, "rm", &["t.txt", "src.txt"]));
    assert_eq!(ok(cmd(&mut sb, "ls", &[])), "a\n");
}

#[test]
fn read_file_chunk_ranges() {
    let (d, mut sb) = default_sandbox();
    write(d.path(), "a.txt", TEXT);
    let out = ok(call(
        &mut sb,
        "read_file_chunk",
        json!({"file": "a.txt", "start_line": 2, "max_lines": 3}),
    ));
    assert_eq!(
        out,
        "     2\tworld\n     3\tHello again\n     4\tfoo\n[lines 2-4 of 8]\n"
    );
    // Defaults: from line 1, up to 50 lines.
    let out = ok(call(&mut sb, "read_file_chunk", json!({"file": "a.txt"})));
    assert!(out.starts_with("     1\thello\n"), "{out}");
    assert!(
        out.ends_with("     8\thello end\n[lines 1-8 of 8]\n"),
        "{out}"
    );
    // A range running past the end is cut at the last line.
    let out = ok(call(
        &mut sb,
        "read_file_chunk",
        json!({"file": "a.txt", "start_line": 7, "max_lines": 10}),
    ));
    assert_eq!(out, "     7\tqux\n     8\thello end\n[lines 7-8 of 8]\n");
    // Starting past the end is an error that says how long the file is.
    let out = call(
        &mut sb,
        "read_file_chunk",
        json!({"file": "a.txt", "start_line": 20}),
    );
    exits(&out, 1);
    assert_eq!(out.stdout, "[start line 20 is past the end: 8 lines]\n");
    // A last line without a newline still counts.
    write(d.path(), "nonl.txt", "one\ntwo");
    assert_eq!(
        ok(call(
            &mut sb,
            "read_file_chunk",
            json!({"file": "nonl.txt"})
        )),
        "     1\tone\n     2\ttwo\n[lines 1-2 of 2]\n"
    );
}

#[test]
fn search_file_context_and_pages() {
    let (d, mut sb) = default_sandbox();
    write(d.path(), "a.txt", TEXT);
    assert_eq!(
        ok(call(
            &mut sb,
            "search_file",
            json!({"file": "a.txt", "search_term": "hello"})
        )),
        "1:hello\n2-world\n3-Hello again\n--\n6-baz\n7-qux\n8:hello end\n[matches 1-2 of 2, page 1 of 1]\n"
    );
    assert_eq!(
        ok(call(
            &mut sb,
            "search_file",
            json!({"file": "a.txt", "search_term": "hello", "ignore_case": true, "context_lines": 0})
        )),
        "1:hello\n--\n3:Hello again\n--\n8:hello end\n[matches 1-3 of 3, page 1 of 1]\n"
    );
    assert_eq!(
        ok(call(
            &mut sb,
            "search_file",
            json!({"file": "a.txt", "search_term": "hello", "context_lines": 0, "page_size": 1, "page": 2})
        )),
        "8:hello end\n[matches 2-2 of 2, page 2 of 2]\n"
    );
    let out = call(
        &mut sb,
        "search_file",
        json!({"file": "a.txt", "search_term": "hello", "page": 3, "page_size": 1}),
    );
    exits(&out, 1);
    assert_eq!(out.stdout, "[page 3 is past the end: 2 matches, 2 pages]\n");
    // The term is literal, not a regex.
    let out = call(
        &mut sb,
        "search_file",
        json!({"file": "a.txt", "search_term": "h.llo"}),
    );
    exits(&out, 1);
    assert_eq!(out.stdout, "[no matches for \"h.llo\"]\n");
}

#[test]
fn write_append_and_replace() {
    let (d, mut sb) = default_sandbox();
    let out = ok(call(
        &mut sb,
        "write_file",
        json!({"file": "dir/new.txt", "content": "alpha beta\nalpha\n"}),
    ));
    assert_eq!(out, "wrote 17 bytes to dir/new.txt\n");
    assert_eq!(read(d.path(), "dir/new.txt"), "alpha beta\nalpha\n");
    let out = ok(call(
        &mut sb,
        "append_file",
        json!({"file": "dir/new.txt", "content": "gamma\n"}),
    ));
    assert_eq!(out, "appended 6 bytes to dir/new.txt\n");
    assert_eq!(read(d.path(), "dir/new.txt"), "alpha beta\nalpha\ngamma\n");
    // append_file creates a missing file.
    ok(call(
        &mut sb,
        "append_file",
        json!({"file": "log.txt", "content": "x"}),
    ));
    assert_eq!(read(d.path(), "log.txt"), "x");
    // write_file replaces.
    ok(call(
        &mut sb,
        "write_file",
        json!({"file": "log.txt", "content": "y"}),
    ));
    assert_eq!(read(d.path(), "log.txt"), "y");

    // Once: ambiguous text is refused and leaves the file unchanged.
    let out = call(
        &mut sb,
        "replace_in_file",
        json!({"file": "dir/new.txt", "old": "alpha", "new": "A"}),
    );
    exits(&out, 1);
    assert_eq!(
        out.stderr,
        "replace_in_file: OLD occurs 2 times in dir/new.txt; give more context or use --all\n"
    );
    assert_eq!(read(d.path(), "dir/new.txt"), "alpha beta\nalpha\ngamma\n");
    let out = ok(call(
        &mut sb,
        "replace_in_file",
        json!({"file": "dir/new.txt", "old": "alpha beta", "new": "-- first --"}),
    ));
    assert_eq!(out, "replaced 1 occurrence(s) in dir/new.txt\n");
    assert_eq!(read(d.path(), "dir/new.txt"), "-- first --\nalpha\ngamma\n");
    let out = call(
        &mut sb,
        "replace_in_file",
        json!({"file": "dir/new.txt", "old": "delta", "new": "x"}),
    );
    exits(&out, 1);
    assert!(out.stderr.contains("OLD not found"), "{}", out.stderr);
    // --all through `"all": true`.
    write(d.path(), "many.txt", "a-a-a\n");
    let out = ok(call(
        &mut sb,
        "replace_in_file",
        json!({"file": "many.txt", "old": "a", "new": "bb", "all": true}),
    ));
    assert_eq!(out, "replaced 3 occurrence(s) in many.txt\n");
    assert_eq!(read(d.path(), "many.txt"), "bb-bb-bb\n");
}

#[test]
fn submit_prints_a_receipt() {
    let (_d, mut sb) = default_sandbox();
    assert_eq!(
        ok(call(&mut sb, "submit", json!({"message": "all done"}))),
        "submitted: all done\n"
    );
    assert_eq!(ok(call(&mut sb, "submit", json!({}))), "submitted:\n");
    // submit is not a shell command.
    let out = bash(&mut sb, "submit now");
    exits(&out, 127);
}

#[test]
fn python_runs_code_in_the_episode_directory() {
    let (d, mut sb) = default_sandbox();
    write(d.path(), "in.txt", "from the host\n");
    let code = "import sys\n\
                print(sum(range(10)))\n\
                print(open('in.txt').read().strip().upper())\n\
                with open('out.txt', 'w') as f:\n    f.write('from python\\n')\n\
                print('to stderr', file=sys.stderr)\n";
    let out = call(&mut sb, "python", json!({ "code": code }));
    assert_eq!(ok(out.clone()), "45\nFROM THE HOST\n");
    assert_eq!(out.stderr, "to stderr\n");
    assert_eq!(read(d.path(), "out.txt"), "from python\n");
    assert!(
        out.usage.written_bytes >= 12 && out.usage.files_created == 1,
        "{:?}",
        out.usage
    );
    // An exception exits 1 with the traceback on stderr.
    let out = call(
        &mut sb,
        "python",
        json!({"code": "raise ValueError('boom')"}),
    );
    exits(&out, 1);
    assert!(out.stderr.contains("ValueError: boom"), "{}", out.stderr);
    // Nothing outside the episode directory.
    let out = call(
        &mut sb,
        "python",
        json!({"code": "import os\ntry:\n    open('../x.txt', 'w')\n    print('escaped')\nexcept OSError as e:\n    print('refused')"}),
    );
    assert_eq!(ok(out), "refused\n");
    assert!(!d.path().parent().unwrap().join("x.txt").exists());
}

// ---- the bash tool ---------------------------------------------------------------------------

#[test]
fn bash_pipes_and_redirections() {
    let (d, mut sb) = default_sandbox();
    write(d.path(), "a.txt", TEXT);
    assert_eq!(
        ok(bash(
            &mut sb,
            "cat a.txt | grep -i hello | sort | head -n 2"
        )),
        "Hello again\nhello\n"
    );
    assert_eq!(ok(bash(&mut sb, "grep o < a.txt | wc -l")), "5\n");
    let out = bash(&mut sb, "seq 3 > n.txt");
    assert_eq!(ok(out), "");
    assert_eq!(read(d.path(), "n.txt"), "1\n2\n3\n");
    ok(bash(&mut sb, "seq 4 5 >> n.txt"));
    assert_eq!(read(d.path(), "n.txt"), "1\n2\n3\n4\n5\n");
    ok(bash(&mut sb, "echo new > n.txt"));
    assert_eq!(read(d.path(), "n.txt"), "new\n");
    // stderr merged into stdout, through a pipe and into a file.
    let out = bash(&mut sb, "cat missing.txt 2>&1");
    exits(&out, 1);
    assert_eq!(out.stdout, "cat: missing.txt: No such file or directory\n");
    assert_eq!(out.stderr, "");
    assert_eq!(ok(bash(&mut sb, "cat missing.txt 2>&1 | wc -l")), "1\n");
    bash(&mut sb, "cat a.txt missing.txt > both.txt 2>&1");
    let both = read(d.path(), "both.txt");
    assert!(
        both.starts_with(TEXT) && both.contains("missing.txt: No such file"),
        "{both}"
    );
    // stderr to a file, stdout untouched.
    let out = bash(&mut sb, "cat a.txt missing.txt 2> err.txt");
    exits(&out, 1);
    assert_eq!(out.stdout, TEXT);
    assert_eq!(out.stderr, "");
    assert_eq!(
        read(d.path(), "err.txt"),
        "cat: missing.txt: No such file or directory\n"
    );
    // Reading a missing file with `<` fails the command.
    let out = bash(&mut sb, "wc -l < nothing.txt");
    exits(&out, 1);
    assert!(out.stderr.contains("nothing.txt"), "{}", out.stderr);
}

#[test]
fn bash_lists_and_negation() {
    let (_d, mut sb) = default_sandbox();
    assert_eq!(ok(bash(&mut sb, "true && echo yes")), "yes\n");
    assert_eq!(ok(bash(&mut sb, "false && echo no; echo after")), "after\n");
    assert_eq!(ok(bash(&mut sb, "false || echo alt")), "alt\n");
    assert_eq!(ok(bash(&mut sb, "true || echo never")), "");
    assert_eq!(ok(bash(&mut sb, "echo a; echo b; echo c")), "a\nb\nc\n");
    exits(&bash(&mut sb, "echo a; false"), 1);
    exits(&bash(&mut sb, "true && false"), 1);
    exits(&bash(&mut sb, "! true"), 1);
    assert_eq!(ok(bash(&mut sb, "! false && echo negated")), "negated\n");
    // A pipeline's status is its last command's.
    exits(&bash(&mut sb, "echo x | grep y"), 1);
    ok(bash(&mut sb, "false | true"));
    ok(bash(&mut sb, "! echo x | grep y"));
}

#[test]
fn bash_quoting() {
    let (d, mut sb) = default_sandbox();
    assert_eq!(
        ok(bash(&mut sb, "echo 'a  b' \"c  d\" e\\ f")),
        "a  b c  d e f\n"
    );
    assert_eq!(ok(bash(&mut sb, "echo '|;&&><*'")), "|;&&><*\n");
    assert_eq!(
        ok(bash(&mut sb, "echo \"it's\" 'say \"hi\"'")),
        "it's say \"hi\"\n"
    );
    assert_eq!(ok(bash(&mut sb, "echo a'b'\"c\"")), "abc\n");
    ok(bash(&mut sb, "echo spaced > 'my file.txt'"));
    assert_eq!(read(d.path(), "my file.txt"), "spaced\n");
    assert_eq!(ok(bash(&mut sb, "cat \"my file.txt\"")), "spaced\n");
    // Quoted globs are not expanded.
    write(d.path(), "x.txt", "");
    assert_eq!(
        ok(bash(&mut sb, "echo '*.txt' \"*.txt\" \\*.txt")),
        "*.txt *.txt *.txt\n"
    );
}

#[test]
fn bash_globs() {
    let (d, mut sb) = default_sandbox();
    for name in [
        "c.txt",
        "a.txt",
        "b.txt",
        "b.md",
        ".hidden.txt",
        "sub/d.txt",
        "sub/e.md",
    ] {
        write(d.path(), name, name);
    }
    assert_eq!(ok(bash(&mut sb, "echo *.txt")), "a.txt b.txt c.txt\n");
    assert_eq!(ok(bash(&mut sb, "echo ?.md")), "b.md\n");
    assert_eq!(ok(bash(&mut sb, "echo [ab].*")), "a.txt b.md b.txt\n");
    assert_eq!(ok(bash(&mut sb, "echo sub/*")), "sub/d.txt sub/e.md\n");
    assert_eq!(ok(bash(&mut sb, "echo */*.md")), "sub/e.md\n");
    assert_eq!(ok(bash(&mut sb, "cat *.txt")), "a.txtb.txtc.txt");
    // No match: the word stays as written.
    assert_eq!(ok(bash(&mut sb, "echo *.nomatch")), "*.nomatch\n");
    let out = bash(&mut sb, "cat *.nomatch");
    exits(&out, 1);
    assert!(out.stderr.contains("*.nomatch"), "{}", out.stderr);
    // Globs never reach outside the episode directory.
    assert_eq!(ok(bash(&mut sb, "echo ../*")), "../*\n");
    assert_eq!(ok(bash(&mut sb, "echo /*")), "/*\n");
}

#[test]
fn bash_errors() {
    let (_d, mut sb) = default_sandbox();
    let out = bash(&mut sb, "nosuchcmd arg");
    exits(&out, 127);
    assert!(
        out.stderr.starts_with("bash: nosuchcmd: command not found"),
        "{}",
        out.stderr
    );
    // Not found in a list: the list goes on.
    assert_eq!(
        ok(bash(&mut sb, "nosuchcmd || echo recovered")),
        "recovered\n"
    );
    for (line, column) in [("echo 'unterminated", 6), ("echo a |", 8)] {
        let out = bash(&mut sb, line);
        exits(&out, 2);
        assert!(
            out.stderr
                .starts_with(&format!("bash: syntax error at column {column}:")),
            "{line}: {}",
            out.stderr
        );
        assert_eq!(out.stdout, "");
    }
    // A syntax error anywhere means nothing runs.
    let out = bash(&mut sb, "echo first; echo 'open");
    exits(&out, 2);
    assert_eq!(out.stdout, "");
    let out = bash(&mut sb, "echo a && && echo b");
    exits(&out, 2);
    assert!(out.stderr.contains("syntax error"), "{}", out.stderr);
}

// ---- arguments and the tool list ------------------------------------------------------------

#[test]
fn arguments_are_validated() {
    let (d, mut sb) = default_sandbox();
    write(d.path(), "a.txt", "a\n");
    let invalid = |r: Result<klong_sandbox::Outcome, SandboxError>, what: &str| match r {
        Err(SandboxError::InvalidArguments { reason, .. }) => {
            assert!(reason.contains(what), "expected {what:?} in {reason:?}")
        }
        other => panic!("expected InvalidArguments ({what}), got {other:?}"),
    };
    match sb.exec("no_such_tool", &json!({})) {
        Err(SandboxError::UnknownTool { tool }) => assert_eq!(tool, "no_such_tool"),
        other => panic!("expected UnknownTool, got {other:?}"),
    }
    invalid(
        sb.exec("read_file_chunk", &json!({"file": 3})),
        "type string",
    );
    invalid(
        sb.exec(
            "read_file_chunk",
            &json!({"file": "a.txt", "start_line": "2"}),
        ),
        "type integer",
    );
    invalid(
        sb.exec(
            "read_file_chunk",
            &json!({"file": "a.txt", "start_line": 0}),
        ),
        ">= 1",
    );
    invalid(
        sb.exec("read_file_chunk", &json!({"file": "a.txt", "bogus": 1})),
        "unknown argument `bogus`",
    );
    invalid(
        sb.exec("read_file_chunk", &json!({})),
        "missing required argument `file`",
    );
    invalid(
        sb.exec("bash", &json!({})),
        "missing required argument `command`",
    );
    invalid(sb.exec("bash", &json!({"command": ["ls"]})), "type string");
    invalid(
        sb.exec(
            "replace_in_file",
            &json!({"file": "a.txt", "old": "a", "new": "b", "all": "yes"}),
        ),
        "type boolean",
    );
    invalid(sb.exec("cat", &json!({"args": ["a.txt", 1]})), "type array");
    invalid(sb.exec("cat", &json!(["a.txt"])), "JSON object");
    invalid(
        sb.exec(
            "write_file",
            &json!({"file": "big.txt", "content": "x".repeat(5 << 20)}),
        ),
        "limit",
    );
    // Refused calls ran nothing and changed nothing.
    assert_eq!(sb.used().fuel, 0);
    assert_eq!(read(d.path(), "a.txt"), "a\n");
    assert!(!d.path().join("big.txt").exists());
    // The same arguments, well-formed, work.
    assert_eq!(
        ok(call(
            &mut sb,
            "read_file_chunk",
            json!({"file": "a.txt", "start_line": 1})
        )),
        "     1\ta\n[lines 1-1 of 1]\n"
    );
}

#[test]
fn openai_tools_lists_agent_tools_only() {
    let registry = registry();
    let tools = registry.openai_tools();
    let tools = tools.as_array().expect("an array");
    let names: Vec<&str> = tools
        .iter()
        .map(|t| t["function"]["name"].as_str().expect("a name"))
        .collect();
    assert_eq!(
        names,
        [
            "append_file",
            "bash",
            "python",
            "read_file_chunk",
            "replace_in_file",
            "search_file",
            "submit",
            "write_file"
        ]
    );
    for t in tools {
        assert_eq!(t["type"], "function");
        let f = &t["function"];
        assert!(!f["description"].as_str().unwrap().is_empty(), "{t}");
        assert_eq!(f["parameters"]["type"], "object", "{t}");
        let name = f["name"].as_str().unwrap();
        assert_eq!(
            f["parameters"],
            registry.get(name).unwrap().manifest.parameters,
            "{name}"
        );
    }
    let schema = |name: &str| -> Value {
        tools
            .iter()
            .find(|t| t["function"]["name"] == name)
            .unwrap()["function"]["parameters"]
            .clone()
    };
    assert_eq!(schema("bash")["required"], json!(["command"]));
    assert_eq!(schema("bash")["properties"]["command"]["type"], "string");
    assert_eq!(schema("python")["required"], json!(["code"]));
    assert_eq!(schema("write_file")["required"], json!(["file", "content"]));
    assert_eq!(
        schema("replace_in_file")["properties"]["all"]["type"],
        "boolean"
    );
    assert_eq!(
        schema("read_file_chunk")["properties"]["start_line"]["minimum"],
        1
    );
    assert_eq!(
        schema("search_file")["required"],
        json!(["file", "search_term"])
    );
    // The plain commands exist in the registry but are not offered to the agent.
    for plain in ["ls", "cat", "grep", "seq"] {
        assert!(registry.get(plain).is_some(), "{plain}");
        assert!(!names.contains(&plain), "{plain}");
    }
    // Every default tool is runnable inside bash except bash itself and submit.
    let commands: Vec<&str> = registry
        .tools()
        .filter(|t| t.manifest.command)
        .map(|t| t.manifest.name.as_str())
        .collect();
    assert!(!commands.contains(&"bash") && !commands.contains(&"submit"));
    assert!(commands.contains(&"python") && commands.contains(&"write_file"));
}

#[test]
fn outcome_reports_usage_and_termination() {
    let (_d, mut sb) = default_sandbox();
    let out = bash(&mut sb, "echo hi > f.txt; cat f.txt");
    assert_eq!(out.tool, "bash");
    assert_eq!(out.termination, Termination::Exited { code: 0 });
    assert_eq!(out.stdout, "hi\n");
    assert!(!out.stdout_truncated && !out.stderr_truncated);
    assert_eq!(out.usage.written_bytes, 3);
    assert_eq!(out.usage.files_created, 1);
    assert!(
        out.usage.fuel > 0 && out.usage.peak_memory > 0,
        "{:?}",
        out.usage
    );
    assert_eq!(sb.used().fuel, out.usage.fuel);
}
