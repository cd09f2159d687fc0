"""Scores of generated answers against references: pure functions, no model.

VQA, as the medical VQA benchmarks report it (VQA-RAD, SLAKE, PathVQA): accuracy on
closed questions, recall of the ground-truth answer's tokens on open ones. The
conventions are LLaVA-Med's and MedAlign's evaluation code, re-implemented here
(read at Aofei-Chang/MedAlign fbefd179, llava-med-1.5/llava/eval/run_eval.py and
eval_metrics/{glossary,evaluate_metrics}.py, the same files as LLaVA-Med's
llava/eval/); the exact rules:

normalize_answer(text)            the toolkit's `normalize_word` (eval_metrics/glossary.py):
    1. each of  ; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !  is deleted where the text
       has it next to a space (or the text holds a digit,digit group), else replaced
       by a space (so "left-sided" -> "left sided", "yes, it is" -> "yes it is");
    2. every "." not followed by a digit is deleted ("3.5" keeps its point), at most
       32 of them (the toolkit passes re.UNICODE (= 32) as re.sub's count);
    3. lowercased and split on whitespace; number words none/zero/one..ten become
       digits ("none" -> "0"); the articles a/an/the are dropped;
    4. the VQA contraction table: "dont" -> "don't", "isnt" -> "isn't", ... (CONTRACTIONS);
    5. joined by single spaces, remaining commas deleted.

Three closed-question rules, each its own key in metrics.json:
closed_hit(prediction, reference)   -> `closed_accuracy`, our headline closed score:
    both normalised; a yes/no reference counts as correct iff the FIRST word of the
    prediction that is "yes" or "no" equals it ("No, there is no effusion" answers
    "no"; "not"/"normal"/"node" are not "no"; no yes/no word at all is wrong); any
    other closed reference (a choice: "left", "ct", "axial") counts iff its words
    appear as a contiguous run of whole words in the prediction.
closed_hit_llava_med(...)           -> `closed_accuracy_llava_med`:
    LLaVA-Med's run_eval_batch.py rule: correct iff the normalised reference is a
    SUBSTRING of the normalised prediction, so "no" is found in "normal" or "node",
    and "yes or no" is right whatever the reference.
closed_hit_medalign(...)            -> `closed_accuracy_medalign`, the number MedAlign reports:
    run_eval.py's `evaluate`: both lowercased and normalised; correct iff "yes" or
    "no" occurs SOMEWHERE in the prediction (a substring: also in "know", "nodule",
    "not") AND the reference is a substring of it. So a choice answer ("left", "CT")
    counts only when the prediction also happens to contain yes/no. run_eval.py counts
    a row WITHOUT an answer_type as closed; `medalign` in vqa_metrics follows that.
open_recall(prediction, reference)  -> `open_recall`, the open score of all three:
    the toolkit's `calculate_f1score` recall on normalised (twice, as run_eval.py
    does), whitespace-split words:
    tp = sum, over the distinct words in both, of the word's count in the
    PREDICTION; fn = sum of the reference counts of reference words absent from
    the prediction; recall = tp / (tp + fn); 0 when either side is empty or tp = 0.
    (Counting the prediction's repeats in tp is the toolkit's, kept for comparable
    numbers: "x x x" against "x y" is 3/4, not 1/2.) `open_f1` is the F1 from the
    same counts (precision = tp / (tp + fp), fp = prediction words not in the
    reference).
The overall VQA score is the mean over all questions of the per-question score
(closed: closed_hit, open: open_recall).

Report metrics (BLEU-1..4, ROUGE-L, METEOR, CIDEr) come from pycocoevalcap, the
COCO caption evaluation code R2Gen and its successors report with: corpus-level
BLEU (option "closest"), ROUGE-L (beta 1.2, mean over samples), CIDEr as COCO reports
it (pycocoevalcap's Cider: the CIDEr-D form, clipped counts and a length penalty, n 4,
sigma 6, x10; document frequencies from the evaluated references, so it needs a corpus:
on one sample it is 0 by construction), METEOR 1.5 (the
jar shipped in pycocoevalcap, run with Java; when Java is missing METEOR is
reported unavailable with the reason, never approximated). Texts are tokenised
before scoring by `tokenize_report`: lowercase, numbers with their decimal point
kept, every other run of non-alphanumeric characters a separator.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
from collections import Counter
from importlib import metadata

# ----------------------------------------------------------------------------- normalisation

_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# LLaVA-Med's pattern, lookbehind typo included: "(?!<=" is a lookahead for the text "<=",
# so in effect: a period not followed by a digit.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
YES_NO = ("yes", "no")

# The VQA toolkit's contraction table (eval_metrics/glossary.py `contractions`), "from to"
# per entry. Its capitalised keys ("Im", "Ive", "Id've", "I'dve") are left out: words
# are lowercased before the lookup, so they never apply.
CONTRACTIONS = dict(pair.split() for pair in """
aint ain't|arent aren't|cant can't|couldve could've|couldnt couldn't|couldn'tve couldn't've
couldnt've couldn't've|didnt didn't|doesnt doesn't|dont don't|hadnt hadn't|hadnt've hadn't've
hadn'tve hadn't've|hasnt hasn't|havent haven't|hed he'd|hed've he'd've|he'dve he'd've|hes he's
howd how'd|howll how'll|hows how's|isnt isn't|itd it'd|itd've it'd've|it'dve it'd've|itll it'll
let's let's|maam ma'am|mightnt mightn't|mightnt've mightn't've|mightn'tve mightn't've|mightve might've
mustnt mustn't|mustve must've|neednt needn't|notve not've|oclock o'clock|oughtnt oughtn't
ow's'at 'ow's'at|'ows'at 'ow's'at|'ow'sat 'ow's'at|shant shan't|shed've she'd've|she'dve she'd've
she's she's|shouldve should've|shouldnt shouldn't|shouldnt've shouldn't've|shouldn'tve shouldn't've
somebody'd somebodyd|somebodyd've somebody'd've|somebody'dve somebody'd've|somebodyll somebody'll
somebodys somebody's|someoned someone'd|someoned've someone'd've|someone'dve someone'd've
someonell someone'll|someones someone's|somethingd something'd|somethingd've something'd've
something'dve something'd've|somethingll something'll|thats that's|thered there'd|thered've there'd've
there'dve there'd've|therere there're|theres there's|theyd they'd|theyd've they'd've|they'dve they'd've
theyll they'll|theyre they're|theyve they've|twas 'twas|wasnt wasn't|wed've we'd've|we'dve we'd've
weve we've|werent weren't|whatll what'll|whatre what're|whats what's|whatve what've|whens when's
whered where'd|wheres where's|whereve where've|whod who'd|whod've who'd've|who'dve who'd've|wholl who'll
whos who's|whove who've|whyll why'll|whyre why're|whys why's|wont won't|wouldve would've
wouldnt wouldn't|wouldnt've wouldn't've|wouldn'tve wouldn't've|yall y'all|yall'll y'all'll
y'allll y'all'll|yall'd've y'all'd've|y'alld've y'all'd've|y'all'dve y'all'd've|youd you'd
youd've you'd've|you'dve you'd've|youll you'll|youre you're|youve you've
""".replace("\n", "|").strip("|").split("|"))


def normalize_answer(text: str) -> str:
    """The VQA toolkit's answer normalisation, normalize_word (the rule is in the module docstring)."""
    text = str(text)
    out = text
    has_digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in _PUNCT:
        if p + " " in text or " " + p in text or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD.sub("", out, count=32)
    words = [_NUMBER_WORDS.get(w, w) for w in out.lower().split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words).replace(",", "")


def _words(text: str) -> list[str]:
    return normalize_answer(text).split()


# ----------------------------------------------------------------------------- per question

def closed_hit(prediction: str, reference: str) -> float:
    """1.0 if the prediction answers the closed question right (first yes/no word rule)."""
    ref, pred = _words(reference), _words(prediction)
    if not ref:
        return 0.0
    if len(ref) == 1 and ref[0] in YES_NO:
        first = next((w for w in pred if w in YES_NO), None)
        return float(first == ref[0])
    n = len(ref)
    return float(any(pred[i:i + n] == ref for i in range(len(pred) - n + 1)))


def closed_hit_llava_med(prediction: str, reference: str) -> float:
    """LLaVA-Med's closed rule: normalised reference is a substring of the normalised prediction."""
    return float(normalize_answer(reference) in normalize_answer(prediction))


def closed_hit_medalign(prediction: str, reference: str) -> float:
    """MedAlign's closed rule (run_eval.py): a yes/no somewhere in the prediction, and the
    reference inside it, both lowercased and normalised."""
    pred, ref = normalize_answer(str(prediction).lower()), normalize_answer(str(reference).lower())
    return float(("yes" in pred or "no" in pred) and ref in pred)


def _overlap(prediction: str, reference: str) -> tuple[int, int, int]:
    """(tp, fp, fn) as LLaVA-Med's calculate_f1score counts them (on texts its run_eval
    has already normalised once: normalised twice, which differs from once only past
    32 full stops)."""
    pred = Counter(_words(normalize_answer(prediction)))
    ref = Counter(_words(normalize_answer(reference)))
    tp = sum(c for w, c in pred.items() if w in ref)
    fp = sum(c for w, c in pred.items() if w not in ref)
    fn = sum(c for w, c in ref.items() if w not in pred)
    return tp, fp, fn


def open_recall(prediction: str, reference: str) -> float:
    """Recall of the reference's tokens in the prediction (LLaVA-Med's counting)."""
    tp, _, fn = _overlap(prediction, reference)
    return tp / (tp + fn) if tp else 0.0


def open_f1(prediction: str, reference: str) -> float:
    tp, fp, fn = _overlap(prediction, reference)
    if not tp:
        return 0.0
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return 2 * precision * recall / (precision + recall)


def question_score(prediction: str, reference: str, answer_type: str) -> float:
    """The per-question score the overall VQA number averages."""
    return closed_hit(prediction, reference) if answer_type == "closed" else open_recall(prediction, reference)


# ----------------------------------------------------------------------------- VQA summary

def vqa_metrics(predictions, references, answer_types) -> dict:
    """Per answer type and overall, as fractions in [0, 1] with counts.

    answer_types: "closed" | "open" | None per question. "closed"/"open" feed our
    scores; "medalign" reproduces run_eval.py, which counts a question without an
    answer type as closed."""
    if not len(predictions) == len(references) == len(answer_types):
        raise ValueError("vqa_metrics: predictions, references and answer_types differ in length")
    rows = list(zip(predictions, references, answer_types))
    closed = [(p, r) for p, r, t in rows if t == "closed"]
    open_ = [(p, r) for p, r, t in rows if t == "open"]
    closed_medalign = [(p, r) for p, r, t in rows if t in ("closed", None)]
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    hits = [closed_hit(p, r) for p, r in closed]
    recalls = [open_recall(p, r) for p, r in open_]
    out = {
        "closed": {"n": len(closed),
                   "accuracy": mean(hits),
                   "accuracy_llava_med": mean([closed_hit_llava_med(p, r) for p, r in closed]),
                   "accuracy_medalign": mean([closed_hit_medalign(p, r) for p, r in closed])},
        "open": {"n": len(open_),
                 "recall": mean(recalls),
                 "f1": mean([open_f1(p, r) for p, r in open_])},
        "medalign": {"closed_n": len(closed_medalign),
                     "closed_accuracy": mean([closed_hit_medalign(p, r) for p, r in closed_medalign]),
                     "open_n": len(open_), "open_recall": mean(recalls)},
    }
    scores = hits + recalls
    out["overall"] = {"n": len(scores), "score": mean(scores)}
    return out


# ----------------------------------------------------------------------------- report metrics

_TOKEN = re.compile(r"\d+(?:\.\d+)+|[^\W_]+")


def tokenize_report(text: str) -> str:
    """Lowercase, punctuation dropped, decimals kept: 'Heart size is normal; 3.5 cm.' ->
    'heart size is normal 3.5 cm'. pycocoevalcap scorers split on spaces."""
    return " ".join(_TOKEN.findall(str(text).lower()))


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


_meteor = None
_meteor_lock = threading.Lock()
_meteor_error: str | None = None


def java_version() -> str | None:
    java = shutil.which("java")
    if java is None:
        return None
    try:
        r = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    line = (r.stderr or r.stdout).strip().splitlines()
    return line[0] if r.returncode == 0 and line else None


def meteor_scorer():
    """The pycocoevalcap METEOR 1.5 scorer (one Java process per Python process, reused),
    or None with `meteor_unavailable()` saying why."""
    global _meteor, _meteor_error
    with _meteor_lock:
        if _meteor is not None or _meteor_error is not None:
            return _meteor
        if java_version() is None:
            _meteor_error = ("METEOR 1.5 (pycocoevalcap) runs in Java and no working `java` is on PATH; "
                             "install a Java runtime (e.g. apt-get install default-jre-headless) to get it")
            return None
        try:
            from pycocoevalcap.meteor.meteor import Meteor
            scorer = Meteor()
            score, _ = scorer.compute_score({0: ["a b c"]}, {0: ["a b c"]})  # fail here, not mid-eval
            if abs(score - 1.0) > 1e-6:
                raise RuntimeError(f"self-check gave {score} for identical texts")
        except Exception as e:  # noqa: BLE001 - any failure means: unavailable, with the reason
            _meteor_error = f"METEOR 1.5 (pycocoevalcap) could not run: {type(e).__name__}: {e}"
            return None
        _meteor = scorer
        return _meteor


def meteor_unavailable() -> str | None:
    return _meteor_error


def report_metrics(predictions, references, meteor: bool = True) -> dict:
    """BLEU-1..4, ROUGE-L, CIDEr (and METEOR) over a corpus of (prediction, reference) pairs.

    Returns {"BLEU_1".., "ROUGE_L", "CIDEr", "METEOR", "n", "unavailable": {metric: reason}}:
    a metric that cannot be computed is None with its reason, never an estimate."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if len(predictions) != len(references):
        raise ValueError("report_metrics: predictions and references differ in length")
    out: dict = {"n": len(predictions), "unavailable": {}}
    names = ["BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "ROUGE_L", "METEOR", "CIDEr"]
    if not predictions:
        return {**out, **{k: None for k in names}}
    res = {i: [tokenize_report(p)] for i, p in enumerate(predictions)}
    gts = {i: [tokenize_report(r)] for i, r in enumerate(references)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out.update({f"BLEU_{n + 1}": float(b) for n, b in enumerate(bleu)})
    out["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    out["METEOR"] = None
    if not meteor:
        out["unavailable"]["METEOR"] = "not computed (--no-meteor)"
    else:
        scorer = meteor_scorer()
        if scorer is None:
            out["unavailable"]["METEOR"] = meteor_unavailable()
        else:
            # Meteor's wire protocol is one line per segment: an empty hypothesis is a blank
            # segment, which it scores 0.
            out["METEOR"] = float(scorer.compute_score(gts, res)[0])
    return out


def implementations(meteor_used: bool, meteor_reason: str | None = None) -> dict:
    """Which code computed each number (package + version), for metrics.json."""
    coco = f"pycocoevalcap {_version('pycocoevalcap')}"
    impl = {
        "closed_accuracy": "distill.metrics.closed_hit (first yes/no word; choice answers as whole words) "
                           "on LLaVA-Med's normalize_word",
        "closed_accuracy_llava_med": "distill.metrics.closed_hit_llava_med (LLaVA-Med run_eval_batch.py rule: "
                                     "normalised reference is a substring of the normalised prediction)",
        "closed_accuracy_medalign": "distill.metrics.closed_hit_medalign (MedAlign llava-med-1.5/llava/eval/"
                                    "run_eval.py evaluate(): 'yes' or 'no' in the prediction AND the reference "
                                    "in it; rows without answer_type count as closed in vqa.medalign)",
        "open_recall": "distill.metrics.open_recall (eval_metrics/evaluate_metrics.py calculate_f1score recall, "
                       "as run_eval.py reports it)",
        "open_f1": "distill.metrics.open_f1 (calculate_f1score F1)",
        "normalization": "distill.metrics.normalize_answer (eval_metrics/glossary.py normalize_word, with its "
                         "contraction table)",
        "tokenization": "distill.metrics.tokenize_report (lowercase, punctuation dropped) before pycocoevalcap",
        "BLEU_1-4": f"{coco} bleu.Bleu(4), corpus-level, option 'closest'",
        "ROUGE_L": f"{coco} rouge.Rouge (beta 1.2), mean over samples",
        "CIDEr": f"{coco} cider.Cider (CIDEr-D form, n 4, sigma 6, x10), idf from the evaluated references",
    }
    if meteor_used:
        impl["METEOR"] = f"{coco} meteor.Meteor (meteor-1.5.jar, -l en -norm) on {java_version()}"
    else:
        impl["METEOR"] = f"not computed: {meteor_reason or meteor_unavailable() or 'not asked for'}"
    return impl
