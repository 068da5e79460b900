"""A verifiable task: sums of two numbers, an exact checker, and rewards as the field writes them.

    prompt        3 4 5 + 6 7 8 =
    completion    <answer> 3 2 0 1 </answer>          then EOS

Numbers are written digit by digit, lowest digit first (345 is "5 4 3"), in the operands and
in the answer alike: that is how a sum is computed, one column at a time with its carry, so a
2-layer model can learn it from a few thousand examples; written highest digit first, it would
have to know every carry before writing the first digit. 543 + 876 = 1419, written "9 1 4 1".

The reward is a program, not a learned model (RL on verifiable rewards, RLVR): `check` parses
the answer and compares it with the gold sum, exactly. As open-r1 and TRL's `trl.rewards` write
them, a reward function takes the completions and the dataset's other columns as keyword lists
and returns a list of floats, so a function written for TRL's GRPOTrainer runs here unchanged:

    accuracy_reward(completions, solution, **kwargs)  1.0 if the answer is the sum, else 0.0
    format_reward(completions, **kwargs)              1.0 if the completion is "<answer> digits </answer>"

A malformed answer scores 0; it never raises. Why a sum of two 3-digit numbers: its answer
space is too large to guess. The sums run from 200 to 1998, and a completion that writes four
digits at random hits a given sum once in 10⁴ tries, so even pass@256 of a guesser is under 3%
(1 − (1 − 10⁻⁴)²⁵⁶ = 2.5%). This is the objection of Cover@τ (Dragoi et al. 2025) to pass@k at
large k: where the answers are few (a multiple-choice letter, a small integer), k samples cover
them by chance. What a sampler can still do here is guess near the answer (one digit off); the
docs (docs/verifiable.md) count that.

Where the starting policy comes from: `tiny.build_task_world` pretrains it on sums whose answers
are only sometimes right (`noisy_completion`): right with probability P_RIGHT, else one digit
changed, and now and then with the closing tag missing. Problems are held out by their text
(loading.is_held_out), never in the pretraining corpus nor among the training prompts.

References: [1] DeepSeek-AI 2025, DeepSeek-R1 (accuracy and format rewards); [2] open-r1 and TRL
`trl/rewards` (the reward functions' form); [3] TinyZero's Countdown scorer (a short exact
checker); [4] Dragoi et al. 2025, "Beyond Pass@k: Breadth-Depth Metrics for Reasoning
Boundaries" (Cover@τ).
"""

import random
import re

OPEN, CLOSE = "<answer>", "</answer>"
VOCAB = [str(d) for d in range(10)] + ["+", "=", OPEN, CLOSE]
DIGITS = 3  # each operand has 3 digits, 100 to 999
P_RIGHT = 0.4  # pretraining: the share of answers that are right
P_NO_CLOSE = 0.1  # pretraining: the share of answers without their closing tag

_FORMAT = re.compile(rf"^\s*{OPEN}((?:\s+\d)+)\s+{CLOSE}\s*$")


def write_number(n: int) -> str:
    """345 → "5 4 3": digit by digit, lowest first."""
    return " ".join(reversed(str(n)))


def read_number(text: str):
    """"5 4 3" → 345; None if `text` is not digits separated by spaces."""
    digits = text.split()
    if not digits or not all(len(d) == 1 and d.isdigit() for d in digits):
        return None
    return int("".join(reversed(digits)))


def make_problem(rng: random.Random) -> tuple:
    """(prompt, solution): a random sum of two DIGITS-digit numbers and its gold answer, as text."""
    low, high = 10 ** (DIGITS - 1), 10**DIGITS - 1
    a, b = rng.randint(low, high), rng.randint(low, high)
    return f"{write_number(a)} + {write_number(b)} =", str(a + b)


def parse_answer(completion: str):
    """The integer inside <answer> … </answer>, or None if the completion is not in that format."""
    match = _FORMAT.match(completion)
    return read_number(match.group(1)) if match else None


def check(completion: str, solution) -> bool:
    """The checker: whether the completion's answer is exactly the gold sum."""
    answer = parse_answer(completion)
    try:
        return answer is not None and answer == int(solution)
    except (TypeError, ValueError):  # a gold answer that is not an integer: nothing can match it
        return False


def accuracy_reward(completions, solution, **kwargs) -> list:
    """1.0 for each completion whose answer is its problem's solution, else 0.0 (TRL's form)."""
    return [float(check(c, s)) for c, s in zip(completions, solution)]


def format_reward(completions, **kwargs) -> list:
    """1.0 for each completion of the form "<answer> d d … </answer>", else 0.0 (TRL's form)."""
    return [float(_FORMAT.match(c) is not None) for c in completions]


def noisy_completion(rng: random.Random, solution: str) -> str:
    """A pretraining answer: the solution with probability P_RIGHT, else with one digit changed."""
    digits = list(reversed(solution))
    if rng.random() >= P_RIGHT:
        i = rng.randrange(len(digits))
        digits[i] = rng.choice([d for d in "0123456789" if d != digits[i]])
    closing = "" if rng.random() < P_NO_CLOSE else f" {CLOSE}"
    return f"{OPEN} {' '.join(digits)}{closing}"
