"""Stage 0, the model: the architecture registry (where a family keeps its blocks and Linear layers,
`registry.py`, `spec.py`) and the inspection that finds a new family's (`inspection.py`); loading a
checkpoint or the embedded model (`loading.py`); placing it on one device or spreading it over a node's
GPUs (`placement.py`); running it one block at a time from its safetensors shards when it does not fit
(`stream.py`); and the modeling code a compressed folder carries (`hf_modeling.py`, imports torch and
transformers only).

Reads: the model folder (config.json, safetensors, tokenizer), or the GGUF file the embedded model's
package ships. Writes: `results/models/<model>/` (rule `prepare_model`, rules/models.smk).
"""
