"""ImportSession: a conversation started with the plain `claude` CLI becomes a daemon session.

The CLI keeps a conversation's transcript in its config dir, under the working directory it
ran in (`projects/<cwd slug>/<id>.jsonl`), and `--resume=<id>` finds it only under its own
working directory; from another, a copy of the file there is resumed with the conversation
whole (measured: docs/agent-protocol.md). So the import copies the transcript under the
agents' working directory (never moves or changes the original), stores its messages as the
session's history, and the session's agent resumes it. Transcripts are read only from the
CLI's own projects folder of the daemon's user.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import structlog

from atomizerd import ids
from atomizerd.agents import transcript as tr
from atomizerd.atomizer.launcher import cli_projects_dir
from atomizerd.atomizer.studies import Studies
from atomizerd.config import Config
from atomizerd.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from atomizerd.sessions import checks
from atomizerd.sessions.table import SessionTable, SessionView
from atomizerd.store.db import Store

log = structlog.get_logger("atomizerd.sessions.importing")


class Importer:
    def __init__(
        self,
        config: Config,
        store: Store,
        studies: Studies,
        table: SessionTable,
        check_limit: Callable[[], None],
    ) -> None:
        self.config = config
        self.store = store
        self.studies = studies
        self.table = table
        self.check_limit = check_limit

    def import_session(
        self,
        agent_session_id: str,
        transcript_path: str,
        *,
        mode: str | None,
        study_id: str,
        session_id: str,
    ) -> tuple[SessionView, int]:
        self.table.check_open()
        self.check_limit()
        source = self._source(agent_session_id, transcript_path)
        conversation = source.stem
        try:
            turns = tr.read(source)
        except tr.TranscriptError as e:
            raise InvalidArgument(f"{source.name}: {e}") from None
        mode = checks.check_mode(self.config, mode or "user")
        if study_id:
            self.studies.resolve(study_id)
        if session_id:
            ids.check_session_id(session_id)
            if self.store.get_session(session_id) is not None:
                raise FailedPrecondition(f"session {session_id!r} already exists")
        else:
            session_id = ids.new_session_id()
        if self.store.agent_session_used(conversation):
            raise FailedPrecondition(f"conversation {conversation} is a daemon session's already")
        self._place(source)
        self.store.create_session(session_id, mode, study_id or None, conversation)
        s = self.table.load(session_id)
        count = self.store.add_imported(
            session_id, [(t.user, t.reply, t.reply_uuid) for t in turns]
        )
        s.record = self.table.write(s, agent_started=True, title=_title(turns[0].user))
        log.info("conversation imported", session_id=session_id, messages=count)
        return self.table.view(s), count

    def _source(self, agent_session_id: str, transcript_path: str) -> Path:
        """The transcript named by its conversation id or its path, inside the projects dir."""
        if bool(agent_session_id) == bool(transcript_path):
            raise InvalidArgument("give either agent_session_id or transcript_path")
        projects = cli_projects_dir(self.config).resolve()
        if agent_session_id:
            if not tr.UUID_RE.fullmatch(agent_session_id):
                raise InvalidArgument("agent_session_id is not a conversation id (a uuid)")
            found = sorted(projects.glob(f"*/{agent_session_id}.jsonl"))
            if not found:
                raise NotFound(f"no transcript of conversation {agent_session_id} in {projects}")
            return found[0]
        path = Path(transcript_path)
        if not path.is_absolute():
            raise InvalidArgument("transcript_path must be absolute")
        resolved = path.resolve()
        if not resolved.is_relative_to(projects) or resolved.parent.parent != projects:
            raise PermissionDenied(
                f"transcript_path must be a transcript in the CLI's projects folder {projects}"
            )
        if not tr.UUID_RE.fullmatch(resolved.stem) or resolved.suffix != ".jsonl":
            raise InvalidArgument("transcript_path does not name a transcript (<uuid>.jsonl)")
        if not resolved.is_file():
            raise NotFound(f"no such transcript: {resolved}")
        return resolved

    def _place(self, source: Path) -> None:
        """A copy of the transcript where the agents' CLI resumes it."""
        folder = source.parent.parent / tr.project_slug(self.config.atomizer_root)
        target = folder / source.name
        if target == source:
            return
        if target.exists():
            raise FailedPrecondition(
                f"conversation {source.stem} is already where the daemon's agents run "
                "(imported before?)"
            )
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        shutil.copyfile(source, target)


def _title(first: str) -> str:
    line = first.strip().splitlines()[0] if first.strip() else ""
    return "".join(c for c in line if c.isprintable())[:80].strip() or "imported"
