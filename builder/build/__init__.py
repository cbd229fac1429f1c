"""The build pipeline: SOURCE -> converted -> ONNX (onnxruntime-genai's builder) -> evaluated
(quality gate, footprint, canary) -> packaged artifact with its manifest.

`pipeline.build_artifact` reads like its stages; `sources`, `convert`, `ortbuild`,
`options`, `evaluate`, `footprint`, `package`, `modelinfo` are the stages' modules and
`progress` shows them on stderr; `sandbox` is an emulated aarch64 device for `--check-arch`."""
