"""The Hugging Face Hub: where a model is (`model_source`: a pipeline folder, a model folder or a Hub
repo id, for every `--model`), pushing it with its model card (`push`), and the self-contained code
pushed with a pipeline so that diffusers alone loads it (`remote_code`)."""
