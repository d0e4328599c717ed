"""The quiet console: a role process's whole output (prints, library logs, its children's output) goes to
<run>/logs/<role>.log and only forage's warnings reach its original stderr, prefixed with the role; the launcher's
console passes stage lines, progress lines, forage's warnings and anyone's errors."""
from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from pathlib import Path

from launcher.logs import PROGRESS, STAGES, logged_actor, logged_task, quiet_console, role_log_dir

ROOT = Path(__file__).resolve().parents[2]


def test_a_role_process_writes_everything_to_its_file_and_only_forage_warnings_to_the_console(tmp_path):
    script = textwrap.dedent(f"""
        import logging, os, subprocess, sys
        from launcher.logs import route_role_output
        route_role_output("actor0", {str(tmp_path)!r}, "INFO")
        print("a print")
        logging.getLogger("vllm.engine").warning("a library warning")
        logging.getLogger("vllm.engine").error("a library error")
        logging.getLogger("actors.actor").info("forage info")
        logging.getLogger("actors.actor").warning("actor0: groups still in flight")
        subprocess.run([sys.executable, "-c", "import sys; print('child out'); print('child err', file=sys.stderr)"])
        os.write(2, b"c-level write\\n")
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert done.stderr.strip().splitlines() == ["[actor0] ERROR vllm.engine: a library error",
                                                "[actor0] WARNING actors.actor: actor0: groups still in flight"]
    log = (tmp_path / "actor0.log").read_text()
    for line in ("a print", "a library warning", "forage info", "groups still in flight", "child out", "child err",
                 "c-level write"):
        assert line in log, (line, log)


def _record(name: str, level: int) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, "message %s", ("x",), None)


def test_the_quiet_console_passes_stages_progress_and_warnings_only():
    handler = logging.StreamHandler()
    file_handler = logging.FileHandler("/dev/null")
    root = logging.getLogger()
    saved = list(root.handlers)
    root.handlers[:] = [handler, file_handler]
    try:
        quiet_console(verbose=False)
    finally:
        root.handlers[:] = saved
        file_handler.close()
    assert handler.filter(_record(STAGES, logging.INFO)) and handler.filter(_record(PROGRESS, logging.INFO))
    assert handler.filter(_record("launcher.start", logging.WARNING)) and handler.filter(_record("vllm", logging.ERROR))
    assert not handler.filter(_record("launcher.start", logging.INFO)) and not handler.filter(_record("ray", 30))
    assert file_handler.filter(_record("launcher.start", logging.INFO))  # the file keeps everything
    assert handler.format(_record(STAGES, logging.INFO)).endswith(" message x")
    assert " WARNING launcher.start: message x" in handler.format(_record("launcher.start", logging.WARNING))


def test_verbose_keeps_the_console_and_the_roles_as_they_are(tmp_path):
    handler = logging.StreamHandler()
    root = logging.getLogger()
    saved = list(root.handlers)
    root.handlers[:] = [handler]
    try:
        quiet_console(verbose=True)
    finally:
        root.handlers[:] = saved
    assert handler.filter(_record("launcher.start", logging.INFO))
    assert role_log_dir({"verbose": True, "out_dir": str(tmp_path)}) is None
    assert role_log_dir({"verbose": False, "out_dir": str(tmp_path)}) == tmp_path / "logs"

    class Role:
        def __init__(self, name: str) -> None:
            self.name = name

    def task() -> str:
        return "done"

    assert logged_actor(Role, "actor0", None) is Role and logged_task(task, "eval", None) is task
    wrapped = logged_actor(Role, "actor0", tmp_path)
    assert wrapped.__name__ == "Role" and issubclass(wrapped, Role)  # Ray titles the process ray::Role
    assert logged_task(task, "eval", tmp_path).__name__ == "task"
