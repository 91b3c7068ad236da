"""`python -m rwkv2rknn.serve OUT`: the model behind an OpenAI-compatible HTTP API, on the board or a PC.

Runtime side, like rwkv2rknn.run: it never imports the compiler. Its web stack (Starlette, uvicorn) is the
`serve` extra, which the `board` extra includes. Modules:
  app        routes, OpenAI-style errors, streaming (server-sent events), --api-key
  protocol   request validation and the API's JSON
  engine     the one model shared by all requests: a fair queue, time slices, cancellation
  cache      the state cache (states after token prefixes, LRU with a byte bound)
  sampling   RWKV sampling with presence/frequency penalties and their defaults; stop sequences
  template   the RWKV World chat template
  statefile  state-tuning files (--state) and saved conversation states (atomic writes)
  page       the chat page at /
See docs/serve.md.
"""
