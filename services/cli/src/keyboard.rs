//! What the user types in `chat`, and printing around it.
//!
//! On a terminal, `chat` reads keystrokes one by one (the terminal's line editing and echo
//! are turned off while it runs, and restored when it ends): so it can tell the others
//! that the user is typing, a pasted line is not cut at the 4095 bytes a terminal's line
//! editor keeps, and a message that arrives while a line is half typed is printed above
//! it, the line redrawn below. Backspace, Enter, Ctrl-D (quit, on an empty line) and
//! Ctrl-C (quit) are understood; other control keys are ignored. From a pipe, whole
//! lines are read as they come.

use std::io::{BufRead, IsTerminal, Read, Write};
use std::os::fd::AsFd;
use std::sync::Mutex;

use rustix::termios::{self, LocalModes, OptionalActions, SpecialCodeIndex, Termios};
use tokio::sync::mpsc;

/// What came from the keyboard.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Key {
    /// A finished line (Enter).
    Line(String),
    /// The line being typed changed (terminals only).
    Typing,
    /// Ctrl-D on an empty line, Ctrl-C, or the end of the input.
    End,
}

/// The line being typed, when keystrokes are read one by one (None otherwise).
static EDITING: Mutex<Option<String>> = Mutex::new(None);

/// Prints `text` as a line of its own on stderr, above the line being typed.
pub(crate) fn say_line(text: &str) {
    print_above(text, false);
}

/// Prints `text` as a line of its own on stdout, above the line being typed.
pub(crate) fn show(text: &str) {
    print_above(text, true);
}

fn print_above(text: &str, to_stdout: bool) {
    let editing = EDITING.lock().ok().and_then(|e| e.clone());
    let line = match &editing {
        Some(_) => format!("\r\x1b[2K{text}\n"),
        None => format!("{text}\n"),
    };
    if to_stdout {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(line.as_bytes());
        let _ = out.flush();
    } else {
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }
    if let Some(typed) = editing {
        let _ = std::io::stderr().lock().write_all(typed.as_bytes());
    }
}

/// `say!` formats like `eprintln!` and prints above the line being typed.
macro_rules! say {
    ($($arg:tt)*) => { $crate::keyboard::say_line(&format!($($arg)*)) };
}
pub(crate) use say;

/// The terminal's settings before `chat` changed them; put back when dropped.
struct Cooked(Termios);

impl Drop for Cooked {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(std::io::stdin().as_fd(), OptionalActions::Now, &self.0);
        if let Ok(mut e) = EDITING.lock() {
            *e = None;
        }
    }
}

/// The keyboard for the life of a chat.
pub(crate) struct Keyboard {
    keys: mpsc::Receiver<Key>,
    _cooked: Option<Cooked>,
}

impl Keyboard {
    /// Keystrokes on a terminal (lines if the terminal cannot be switched), lines from a pipe.
    pub(crate) fn open() -> Self {
        let (tx, keys) = mpsc::channel(256);
        let stdin = std::io::stdin();
        let cooked = if stdin.is_terminal() {
            keystrokes_mode()
        } else {
            None
        };
        if cooked.is_some() {
            std::thread::spawn(move || read_keys(tx));
        } else {
            std::thread::spawn(move || read_lines(tx));
        }
        Self {
            keys,
            _cooked: cooked,
        }
    }

    /// The next key; [`Key::End`] once input is over (and ever after).
    pub(crate) async fn next(&mut self) -> Key {
        self.keys.recv().await.unwrap_or(Key::End)
    }
}

/// Turns off line editing, echo and signal keys; the settings to restore.
fn keystrokes_mode() -> Option<Cooked> {
    let fd = std::io::stdin();
    let saved = termios::tcgetattr(fd.as_fd()).ok()?;
    let mut raw = saved.clone();
    raw.local_modes
        .remove(LocalModes::ICANON | LocalModes::ECHO | LocalModes::ISIG | LocalModes::IEXTEN);
    raw.special_codes[SpecialCodeIndex::VMIN] = 1;
    raw.special_codes[SpecialCodeIndex::VTIME] = 0;
    termios::tcsetattr(fd.as_fd(), OptionalActions::Now, &raw).ok()?;
    if let Ok(mut e) = EDITING.lock() {
        *e = Some(String::new());
    }
    Some(Cooked(saved))
}

fn read_lines(tx: mpsc::Sender<Key>) {
    for line in std::io::stdin().lock().lines().map_while(Result::ok) {
        if tx.blocking_send(Key::Line(line)).is_err() {
            return;
        }
    }
    let _ = tx.blocking_send(Key::End);
}

fn read_keys(tx: mpsc::Sender<Key>) {
    let mut editor = Editor::default();
    let mut buf = [0u8; 4096];
    let mut stdin = std::io::stdin().lock();
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) | Err(_) => {
                let _ = tx.blocking_send(Key::End);
                return;
            }
            Ok(n) => n,
        };
        let (keys, echo) = editor.feed(&buf[..n]);
        if let Ok(mut e) = EDITING.lock() {
            *e = Some(editor.line.clone());
        }
        if !echo.is_empty() {
            let _ = std::io::stderr().lock().write_all(echo.as_bytes());
        }
        for key in keys {
            let end = key == Key::End;
            if tx.blocking_send(key).is_err() || end {
                return;
            }
        }
    }
}

/// The line being typed, fed with the bytes of keystrokes.
#[derive(Default)]
struct Editor {
    line: String,
    /// Bytes of a character not complete yet.
    partial: Vec<u8>,
    /// Inside an escape sequence (arrow keys and the like), which is skipped.
    escape: Escape,
}

#[derive(Default, PartialEq, Eq, Clone, Copy)]
enum Escape {
    #[default]
    None,
    Started,
    Csi,
}

impl Editor {
    /// The keys these bytes make, and what to write to the terminal for them.
    fn feed(&mut self, bytes: &[u8]) -> (Vec<Key>, String) {
        let (mut keys, mut echo) = (Vec::new(), String::new());
        let mut typed = false;
        for &b in bytes {
            match self.escape {
                Escape::Started => {
                    self.escape = if b == b'[' || b == b'O' {
                        Escape::Csi
                    } else {
                        Escape::None
                    };
                    continue;
                }
                Escape::Csi => {
                    if (0x40..=0x7e).contains(&b) {
                        self.escape = Escape::None;
                    }
                    continue;
                }
                Escape::None => {}
            }
            match b {
                0x1b => self.escape = Escape::Started,
                b'\r' | b'\n' => {
                    if typed {
                        keys.push(Key::Typing);
                        typed = false;
                    }
                    // The typed line goes; the chat shows it as sent.
                    echo.push_str("\r\x1b[2K");
                    keys.push(Key::Line(std::mem::take(&mut self.line)));
                    self.partial.clear();
                }
                0x7f | 0x08 => {
                    if self.line.pop().is_some() {
                        echo.push_str("\x08 \x08");
                        typed = true;
                    }
                }
                // Ctrl-C quits; Ctrl-D quits on an empty line.
                0x03 => keys.push(Key::End),
                0x04 if self.line.is_empty() => keys.push(Key::End),
                b'\t' => {
                    self.line.push(' ');
                    echo.push(' ');
                    typed = true;
                }
                b if b < 0x20 => {}
                b => {
                    self.partial.push(b);
                    match std::str::from_utf8(&self.partial) {
                        Ok(s) => {
                            self.line.push_str(s);
                            echo.push_str(s);
                            self.partial.clear();
                            typed = true;
                        }
                        // A character longer than 4 bytes is not UTF-8: drop it.
                        Err(e) if e.error_len().is_some() || self.partial.len() >= 4 => {
                            self.partial.clear()
                        }
                        Err(_) => {}
                    }
                }
            }
            if keys.last() == Some(&Key::End) {
                break;
            }
        }
        if typed {
            keys.push(Key::Typing);
        }
        (keys, echo)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(keys: &[Key]) -> Vec<&str> {
        keys.iter()
            .filter_map(|k| match k {
                Key::Line(l) => Some(l.as_str()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn keystrokes_make_lines_with_backspace_utf8_and_escapes_skipped() {
        let mut e = Editor::default();
        let (keys, echo) = e.feed(b"hex\x7flo");
        assert_eq!(keys, [Key::Typing]);
        assert_eq!(e.line, "helo");
        assert!(echo.contains("\x08 \x08"));
        // An arrow key (ESC [ A) changes nothing; a multi-byte character split across reads.
        let (keys, _) = e.feed(b"\x1b[A \xc3");
        assert_eq!(keys, [Key::Typing]);
        let (keys, _) = e.feed(b"\xa9\r");
        assert_eq!(lines(&keys), ["helo é"]);
        assert_eq!(e.line, "");
        // A paste longer than a terminal's line editor keeps arrives whole.
        let long = "x".repeat(10_000);
        let (keys, _) = e.feed(format!("{long}\n").as_bytes());
        assert_eq!(lines(&keys), [long.as_str()]);
    }

    #[test]
    fn ctrl_d_ends_only_an_empty_line_and_ctrl_c_always() {
        let mut e = Editor::default();
        let (keys, _) = e.feed(b"ab\x04");
        assert!(!keys.contains(&Key::End), "{keys:?}");
        let (keys, _) = e.feed(b"\x03");
        assert_eq!(keys, [Key::End]);
        let mut e = Editor::default();
        let (keys, _) = e.feed(b"\x04more");
        assert_eq!(keys, [Key::End]);
        // Bytes that are not UTF-8 are dropped, not kept forever.
        let mut e = Editor::default();
        let _ = e.feed(b"\xff\xfeok");
        assert_eq!(e.line, "ok");
    }
}
