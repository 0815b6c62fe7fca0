"""Small generated data sets for the demo and the tests.

Both follow a rule simple enough that a few dozen training steps show it being
learnt, and both are the same for the same seed. Plain Python: no torch, no Django.
"""

import csv
import json
import random
import string

STRING_OPERATIONS = {
    "reverse": lambda word: word[::-1],
    "upper": str.upper,
    "sort": lambda word: "".join(sorted(word)),
}

SUBJECTS = ("the movie", "the soup", "our trip", "the hotel", "this phone", "the concert", "the book", "the service")
POSITIVE_WORDS = ("great", "lovely", "wonderful", "delightful", "excellent", "charming", "superb", "pleasant")
NEGATIVE_WORDS = ("awful", "dreadful", "terrible", "boring", "horrible", "miserable", "dismal", "unpleasant")
INTENSIFIERS = ("", "really ", "quite ", "truly ", "rather ")


def write_instruction_set(path, rows=400, seed=0):
    """Write JSONL rows {"prompt": "reverse: abcde\\n", "completion": "edcba"} (and upper, sort)."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as file:
        for _ in range(rows):
            operation = rng.choice(sorted(STRING_OPERATIONS))
            word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(5, 8)))
            row = {"prompt": f"{operation}: {word}\n", "completion": STRING_OPERATIONS[operation](word)}
            file.write(json.dumps(row) + "\n")
    return path


def write_classification_set(path, rows=400, seed=0):
    """Write a CSV `text,label` of short reviews; the label is the list its one opinion word comes from."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["text", "label"])
        for _ in range(rows):
            label = rng.choice(("positive", "negative"))
            opinion = rng.choice(POSITIVE_WORDS if label == "positive" else NEGATIVE_WORDS)
            text = f"{rng.choice(SUBJECTS)} was {rng.choice(INTENSIFIERS)}{opinion}"
            writer.writerow([text, label])
    return path
