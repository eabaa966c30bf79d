"""Models and their files: the Qwen2/Llama decoder and LoRA (policy), the KV-cache sampler (sampler),
Hugging Face directories and PEFT adapters (hf, peft_io), GGUF conversion and model sources (gguf_convert,
model_files), tiny tokenizers and random models for tests and the toy (toy). Imports core only."""
