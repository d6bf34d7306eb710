"""Using a stage: text generation and an OpenAI-compatible HTTP server.

`textgen` streams a prompt's completion as text (stop strings, multi-byte characters) on top of
`atoll.model.generate`; `engine` runs requests one at a time on a worker thread with a bounded
queue; `api` is the FastAPI application (/v1/completions, /v1/chat/completions, /v1/models,
/health); `commands` adds `atoll generate` and `atoll serve`.
"""
