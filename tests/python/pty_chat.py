"""Drives `switchboard chat` through a pseudo-terminal, as a person at a keyboard would.

    python3 pty_chat.py <the chat command...>

Waits for the chat to start, types "hi" key by key (so the chat tells the others it is
typing), presses Enter, pastes a 10,000-character line (more than a terminal's line editor
keeps) and presses Enter, then Ctrl-D. Prints one JSON object: the exit code, whether the
terminal's line editing and echo were restored, and everything the chat printed. Every
wait is bounded.
"""
import json
import os
import pty
import select
import subprocess
import sys
import termios
import time

LONG = "y" * 10_000


def main():
    master, slave = pty.openpty()
    keep = os.dup(slave)  # to read the terminal's settings after the chat exits
    child = subprocess.Popen(sys.argv[1:], stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    seen = bytearray()

    def wait_for(text, limit=20.0):
        deadline = time.monotonic() + limit
        while text.encode() not in seen and time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    seen.extend(os.read(master, 65536))
                except OSError:
                    return False
        return text.encode() in seen

    ok = wait_for("chat in")
    # Give the stream a moment to subscribe before typing.
    time.sleep(1.0)
    for ch in "hi":
        os.write(master, ch.encode())
        time.sleep(0.3)
    time.sleep(1.0)
    os.write(master, b"\r")
    ok = ok and wait_for("bob: hi")
    for i in range(0, len(LONG), 1000):
        os.write(master, LONG[i:i + 1000].encode())
    os.write(master, b"\r")
    ok = ok and wait_for("bob: " + LONG[:100])
    os.write(master, b"\x04")
    # Keep reading while waiting: a full terminal buffer would block the chat's writes.
    deadline = time.monotonic() + 10
    code = None
    while time.monotonic() < deadline:
        code = child.poll()
        if code is not None:
            break
        wait_for("\0", 0.1)
    if code is None:
        child.kill()
        child.wait()
    wait_for("\0", 0.3)  # drain what is left
    flags = termios.tcgetattr(keep)[3]
    restored = bool(flags & termios.ICANON) and bool(flags & termios.ECHO)
    print(json.dumps({
        "steps_ok": ok,
        "exit": code,
        "restored": restored,
        "output": seen.decode("utf-8", "replace"),
    }))


if __name__ == "__main__":
    main()
