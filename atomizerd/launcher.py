"""What an agent process is started with, for one session: the mode's permission policy, the
study folder, the system-prompt context, and the command line built from them."""

from __future__ import annotations

import os
from dataclasses import dataclass

from atomizerd.agent.argv import AgentSpec, build_argv, build_env
from atomizerd.config import Config
from atomizerd.context import Studies
from atomizerd.prompt import ContextBuilder
from atomizerd.store import SessionRecord


@dataclass(frozen=True)
class LaunchSpec:
    argv: list[str]
    env: dict[str, str]
    cwd: str


class Launcher:
    def __init__(self, config: Config, studies: Studies, context: ContextBuilder) -> None:
        self.config = config
        self.studies = studies
        self.context = context

    def spec_for(self, record: SessionRecord, *, resume: bool, seed: str = "") -> LaunchSpec:
        study_dir = self.studies.resolve(record.study_id) if record.study_id else None
        prompt = self.context.build(record.mode, record.study_id, study_dir)
        if seed:
            prompt += "\n\n" + seed
        spec = AgentSpec(
            command=tuple(self.config.agent.command),
            conversation_id=record.agent_session_id,
            resume=resume,
            **self._permissions(record.mode),
            append_system_prompt=prompt,
            add_dirs=(str(study_dir),) if study_dir else (),
            model=self.config.agent.model or None,
            extra_args=tuple(self.config.agent.args),
        )
        return LaunchSpec(
            argv=build_argv(spec),
            env=build_env(os.environ, self.config.agent.env),
            cwd=str(self.config.atomizer_root),
        )

    def _permissions(self, mode: str) -> dict[str, object]:
        if mode == "power":
            return {"skip_permissions": True}
        return {"allowed_tools": tuple(self.config.modes.user.allowed_tools)}
