"""Video jobs (OpenAI's Videos API) on the shared step-level engine.

`spec` turns a request's fields into engine parameters (pure), `jobs` keeps the bounded job
store with expiry (and marks jobs a restart interrupted as failed), `content` keeps finished
MP4s and thumbnails on disk up to a byte bound, `encode` writes H.264 MP4 (PyAV) and PNG,
`service` ties a job to its engine request. The HTTP routes are `serving.http.videos`.
"""
