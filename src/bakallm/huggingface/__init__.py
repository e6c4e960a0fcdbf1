"""The Hugging Face format of a bakallm model: `bakallm export` and the modeling file it ships."""
