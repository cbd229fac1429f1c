"""Serving local prompts: the OpenAI-compatible API (`api`, `server`; `responses` turns worker
events into its answers), the slots, queue and
hot switch between model workers (`host`), metrics, and the model itself: the runtime
(`runtime`) over onnxruntime-genai's C API (`oga`), run in a worker process (`worker`)."""
