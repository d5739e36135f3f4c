"""The Hugging Face Hub: where a model is (`model_source`: a pipeline folder, a model folder or a Hub
repo id, for every `--model`), its model card (`card`), pushing it with the card in one commit
(`push`), and the self-contained code pushed with a pipeline so that diffusers alone loads it
(`remote_code`)."""
