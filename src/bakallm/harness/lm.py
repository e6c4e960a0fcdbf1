"""The `bakallm` model of lm-evaluation-harness.

- `loglikelihood_rolling` reads each document whole with the recurrent state carried, exactly as
  `bakallm bench` does (not the harness's independent windows), several documents side by side.
  As in bench, a document's first token is not scored: bakallm models have no beginning-of-text
  token to predict it from.
- `loglikelihood` reads the context window by window, then scores the continuation's tokens.
- `generate_until` continues each context with bakallm.generation (greedy unless do_sample).

model_args: path (run directory, checkpoint or exported folder), tokenizer (default the model's),
n_ctx (state reset every n_ctx tokens in rolling scoring, default 1048576), batch_size, device.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from bakallm.acceleration import resolve_device
from bakallm.data.token_cache import TokenizedCorpus
from bakallm.data.tokenizers import load_tokenizer
from bakallm.errors import UserError
from bakallm.evaluation.evaluate import score_articles
from bakallm.evaluation.settings import OUR_N_CTX, EvalSettings
from bakallm.generation import Sampling, generate_text
from bakallm.model.io import load_model, model_files

eval_logger = logging.getLogger("lm-eval")

DEFAULT_N_CTX = OUR_N_CTX
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_GEN_TOKS = 256


@register_model("bakallm")
class BakaLMHarness(LM):
    def __init__(
        self,
        path: str,
        tokenizer: str | None = None,
        n_ctx: int = DEFAULT_N_CTX,
        batch_size: int | str | None = DEFAULT_BATCH_SIZE,
        device: str | None = "auto",
        **unused,
    ):
        super().__init__()
        files = model_files(path)
        spec = tokenizer or files.tokenizer
        if spec is None:
            raise UserError(
                f"{path} names no tokenizer; pass the one the model was trained with as model_args tokenizer=..."
            )
        self.tokenizer = load_tokenizer(spec)
        if device and device.startswith("cuda") and not torch.cuda.is_available():
            # The harness asks for cuda unless told otherwise; on a machine without it, run on CPU.
            eval_logger.warning("bakallm: no CUDA device here, running on the CPU.")
            device = "cpu"
        self._device = resolve_device(device or "auto")
        self.model = load_model(path, self._device).eval()
        self.n_ctx = int(n_ctx)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else DEFAULT_BATCH_SIZE

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        texts = [request.args[0] for request in requests]
        token_lists = self.tokenizer.encode_batch(texts)
        if not any(len(tokens) >= 2 for tokens in token_lists):
            return [0.0] * len(texts)
        corpus = TokenizedCorpus.from_token_lists(token_lists, vocab_size=self.tokenizer.vocab_size, texts=texts)
        tally = score_articles(
            self.model,
            corpus,
            EvalSettings(n_ctx=self.n_ctx, batch_size=self.batch_size, device=self._device, progress=not disable_tqdm),
        )
        return [-float(total) for total in tally.nll_sum]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return [self._continuation(*request.args) for request in requests]

    @torch.inference_mode()
    def _continuation(self, context: str, continuation: str) -> tuple[float, bool]:
        """Log-probability of the continuation's tokens after the context's, and whether each is the argmax."""
        context_ids, continuation_ids = self.tokenizer.encode(context), self.tokenizer.encode(continuation)
        ids = torch.tensor([context_ids + continuation_ids], dtype=torch.long, device=self._device)
        inputs, targets = ids[:, :-1], ids[0, 1:]
        first_scored = max(len(context_ids) - 1, 0)  # without a context, the first token has no prediction
        window = self.model.config.window
        state, total, greedy = None, 0.0, True
        for start in range(0, inputs.shape[1], window):
            stop = min(start + window, inputs.shape[1])
            output = self.model(inputs[:, start:stop], state=state, return_logits=stop > first_scored)
            state = output.state
            if stop > first_scored:
                offset = max(first_scored - start, 0)
                log_probs = F.log_softmax(output.logits[0, offset:].float(), dim=-1)
                wanted = targets[start + offset : stop]
                total += float(log_probs.gather(1, wanted.unsqueeze(1)).sum())
                greedy = greedy and bool((log_probs.argmax(-1) == wanted).all())
        return total, greedy

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        outputs = []
        for request in requests:
            context, options = request.args
            stop = options.get("until") or []
            stop = [stop] if isinstance(stop, str) else list(stop)
            sampling = Sampling(temperature=float(options.get("temperature", 1.0)) if options.get("do_sample") else 0.0)
            max_new_tokens = int(options.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            outputs.append(generate_text(self.model, self.tokenizer, [context], max_new_tokens, sampling, stop=stop)[0])
        return outputs

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name
