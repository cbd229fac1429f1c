"""`python -m agent.serving.worker MODEL_DIR`: the model-worker process the API process starts."""

from agent.serving.worker.process import run_and_exit

run_and_exit()
