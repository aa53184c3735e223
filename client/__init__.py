"""The streaming gRPC client and its command line (installed as ``flashportrait.client``).

- `client`: `FlashPortraitClient` (features, text embeddings, streaming generations, cancellation).
- `progress`: the progress line of `flashportrait animate`.
- `cli`: `flashportrait animate`.
"""
