"""Replay-side frame authentication: every recorded frame's MAC checked under the recording's session key.

A replay passes the recording's frames (file order) through :meth:`FrameAuthenticator.filter`, which
yields the frames that may be classified and sorts the others, by frame index, into

* ``tampered``: the MAC does not match (pixels or header changed, a header's index rewritten, ...);
* ``spliced``: a frame of another session: its header names another session than the recording's, or it
  claims the recording's session but its MAC is that of another session seen in the recording (checked
  with a master key only: a session key cannot derive other sessions' keys);
* ``duplicated``: an authentic (session, index) pair seen before;
* ``reordered``: an authentic frame whose index is lower than an earlier authentic frame's (not a duplicate);
* ``unauthenticated``: a frame without a MAC (format 2 recordings always have one).

Tampered, spliced, duplicated and unauthenticated frames are skipped: the MAC is what makes a frame's
prediction trustworthy (its pixels and its index, hence its keyed orders), so a frame without a valid
one is not classified. A reordered frame is authentic (its own index and pixels are intact) and is
classified in file order, like every other frame. None of this is damage: a damaged chunk's frames never
reach the authenticator and stay in the report's ``frames_lost``/``problems``.

Nothing secret is reported: indices, session nonces (public) and counts only.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from sensor.errors import KeyFileError, PrivcamError
from sensor.frame import ProtectedFrame
from sensor.frameauth import verify_frame
from sensor.keys import Key, parse_nonce

KINDS = ("tampered", "spliced", "duplicated", "reordered", "unauthenticated")
MAX_LISTED = 1000  # frame indices listed per kind (the counts stay exact)
MAX_DETAILS = 20
MAX_OTHER_SESSIONS = 16  # other sessions' keys tried on a frame whose MAC fails


def session_key(where: str, key: Key, session: str) -> Key:
    """The key of one session's frames (``where``: the recording or source, for messages): derived from a
    master key, or the session key itself when it is that session's (any other is refused, naming both)."""
    if not session:
        return key
    try:
        return key.for_session(parse_nonce(session, f"{where}: session"))
    except KeyFileError as err:
        raise PrivcamError(f"{where}: {err}") from None


@dataclass
class AuthReport:
    """What the authentication of a replay found. ``verified``: frames whose MAC checked under the
    recording's session key (each copy of a duplicate counts). Lists hold frame indices as the frames'
    headers state them, in file order (at most :data:`MAX_LISTED` each; ``counts`` are exact); ``details``
    says more about the first few."""

    verified: int = 0
    lists: dict[str, list[int]] = field(default_factory=lambda: {kind: [] for kind in KINDS})
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    details: list[str] = field(default_factory=list)

    @property
    def failures(self) -> int:
        """Frames skipped as unauthentic (tampered, spliced, duplicated, unauthenticated)."""
        return sum(self.counts[kind] for kind in KINDS if kind != "reordered")

    def add(self, kind: str, index: int, detail: str) -> None:
        self.counts[kind] += 1
        if len(self.lists[kind]) < MAX_LISTED:
            self.lists[kind].append(index)
        if len(self.details) < MAX_DETAILS:
            self.details.append(detail)

    def to_dict(self) -> dict[str, Any]:
        """JSON form: verified, one list per kind, failures, counts (when a list was cut), details."""
        out: dict[str, Any] = {"verified": self.verified, **{k: list(v) for k, v in self.lists.items()},
                               "failures": self.failures, "details": list(self.details)}
        if any(self.counts[k] > len(self.lists[k]) for k in KINDS):
            out["counts"] = dict(self.counts)
        if sum(self.counts.values()) > len(self.details):
            out["details"].append(f"... {sum(self.counts.values()) - len(self.details)} more")
        return out


class FrameAuthenticator:
    """Checks a recording's frames in file order (see the module docstring).

    Args:
        key: the master key, or the recording's session key.
        session: the recording's session nonce (32 hex digits, "" for master-key frames).
        where: the recording, for messages.
    """

    def __init__(self, key: Key, session: str, where: str) -> None:
        self.key, self.session, self.where = key, session, where
        self.session_key = session_key(where, key, session)
        self.report = AuthReport()
        self._seen: set[tuple[str, int]] = set()
        self._highest = -1
        self._others: dict[str, Key | None] = {}  # other sessions met in the recording -> their key

    def _other_key(self, session: str) -> Key | None:
        if session not in self._others and len(self._others) < MAX_OTHER_SESSIONS:
            try:
                self._others[session] = session_key(self.where, self.key, session)
            except PrivcamError:  # a session key opens only its own session; a malformed nonce
                self._others[session] = None
        return self._others.get(session)

    def check(self, frame: ProtectedFrame) -> str | None:
        """None when ``frame`` may be classified (authentic; maybe reordered), else the kind it was skipped as."""
        m, report = frame.meta, self.report
        if not m.mac:
            report.add("unauthenticated", m.frame_index, f"frame {m.frame_index}: no MAC")
            return "unauthenticated"
        if m.session != self.session:
            other = self._other_key(m.session)
            how = ("an authentic frame of that session" if other is not None and verify_frame(other, frame)
                   else "its MAC does not verify under that session either")
            report.add("spliced", m.frame_index, f"frame {m.frame_index}: from session {m.session or '(none)'}, "
                       f"not the recording's {self.session or '(none)'} ({how})")
            return "spliced"
        if not verify_frame(self.session_key, frame):
            for session, other in list(self._others.items()):
                if other is not None and verify_frame(other, ProtectedFrame(frame.data, replace(m, session=session))):
                    report.add("spliced", m.frame_index, f"frame {m.frame_index}: a frame of session {session} "
                               "whose header was rewritten to this recording's session")
                    return "spliced"
            report.add("tampered", m.frame_index, f"frame {m.frame_index}: MAC mismatch (header or pixels changed)")
            return "tampered"
        report.verified += 1
        pair = (m.session, m.frame_index)
        if pair in self._seen:
            report.add("duplicated", m.frame_index, f"frame {m.frame_index}: (session {m.session or '(none)'}, index "
                       f"{m.frame_index}) seen before")
            return "duplicated"
        self._seen.add(pair)
        if m.frame_index < self._highest:
            report.add("reordered", m.frame_index, f"frame {m.frame_index}: after frame {self._highest}")
        self._highest = max(self._highest, m.frame_index)
        return None

    def filter(self, frames: Iterable[ProtectedFrame]) -> Iterator[ProtectedFrame]:
        """The frames that may be classified, in file order; the others are counted in :attr:`report`."""
        for frame in frames:
            if self.check(frame) is None:
                yield frame
