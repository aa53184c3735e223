"""Errors of the face front end that a user can cause, with messages they can act on.

The serving adapters turn these into per-request errors (never stack traces); everything else that
goes wrong in the front end is a bug and propagates as usual.
"""

from __future__ import annotations


class FaceFrontEndError(ValueError):
    """Base class: the driving media cannot be turned into aligned face crops."""


class MediaError(FaceFrontEndError):
    """The driving media cannot be read: not a video/image, corrupt, empty, or without a video stream."""


class NoFaceError(FaceFrontEndError):
    """No frame of the driving media contains a face the detector and landmark model accept."""
