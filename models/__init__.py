"""Models to compile and test with: small seeded torch reference models (`reference`) and the packaged
real models, data and tokenizers (`real`). Both cache their ONNX exports under `$MODELSURGEON_CACHE`
(default ~/.cache/modelsurgeon)."""
