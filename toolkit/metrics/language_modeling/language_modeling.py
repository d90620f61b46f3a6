"""Language-modeling metrics from per-example sums, as an `evaluate` module loaded by local path.

The toolkit gathers per-example sums from every process (`gather_for_metrics`, so each held-out
example counts once) and adds them here; corpus-level numbers are ratios of sums, never means of
per-batch means.
"""

import math

import datasets
import evaluate

_DESCRIPTION = """
loss: mean negative log-likelihood per predicted token (nats).
perplexity: exp(sum NLL / sum predicted tokens).
bits_per_byte: sum NLL / (ln 2 x UTF-8 bytes of the scored text), comparable across tokenizers.
accuracy: share of predicted tokens where the argmax is the next token.
tokens, documents: how many predicted tokens and held-out documents were scored.
"""

_KWARGS_DESCRIPTION = """
Args (one entry per scored example or window):
    nll: sum of token negative log-likelihoods (nats).
    tokens: number of predicted tokens.
    correct: number of predicted tokens whose argmax was right.
    n_bytes: UTF-8 bytes of the document text (on a document's first window only, else 0).
    documents: 1 on a document's first window, else 0.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class LanguageModeling(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({
                "nll": datasets.Value("float64"),
                "tokens": datasets.Value("int64"),
                "correct": datasets.Value("int64"),
                "n_bytes": datasets.Value("int64"),
                "documents": datasets.Value("int64"),
            }),
        )

    def _compute(self, nll, tokens, correct, n_bytes, documents):
        total_nll, total_tokens, total_bytes = math.fsum(nll), sum(tokens), sum(n_bytes)
        loss = total_nll / total_tokens if total_tokens else float("nan")
        return {
            "loss": loss,
            "perplexity": math.exp(loss) if total_tokens else float("nan"),
            "bits_per_byte": total_nll / (math.log(2) * total_bytes) if total_bytes else float("nan"),
            "accuracy": sum(correct) / total_tokens if total_tokens else float("nan"),
            "tokens": total_tokens,
            "documents": sum(documents),
        }
