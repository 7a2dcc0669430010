"""Session set-up shared by every test file."""

from __future__ import annotations

import signal

# A test run started in the background of a non-interactive shell (`cmd &`) inherits SIGINT
# ignored, and so would every dllama process the tests start: the tests that interrupt a
# worker, a chat or a server would then see it go on. A handler (unlike SIG_IGN) is reset to
# the default in a child at exec, so the children get Python's KeyboardInterrupt back.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
