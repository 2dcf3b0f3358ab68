"""Metric of the generation tasks (tq_passkey, tq_kv_recall): exact recall of a number."""

import re


def score(answer: str, generation: str) -> int:
    """1 if the first number in ``generation`` is ``answer``, else 0."""
    m = re.search(r"\d+", generation)
    return int(m is not None and m.group(0) == answer)


def process_results(doc, results):
    (generation,) = results
    return {"acc": score(doc["answer"], generation)}
