"""Pair discovery and the dataset report: edit images matched 1:1 to references, captions, buckets.

Listing is by file name (cheap, on the driver); checking reads every image and caption once, in Ray Data
tasks, and records the content hashes the cache keys on. Every problem is collected, each naming its file.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any

from PIL import Image

from longcat_ray import generated, hub_rows
from longcat_ray.buckets import bucket_for
from longcat_ray.config import Config, DatasetConfig
from longcat_ray.images import upright_rgb
from longcat_ray.storage import filesystem

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True, kw_only=True)
class Problem:
    """One bad input, naming the file."""

    kind: str
    file: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.kind}: {self.file}" + (f" ({self.detail})" if self.detail else "")


class DatasetError(Exception):
    """The dataset report: every problem found before encoding."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__(format_report(problems))


def format_report(problems: list[Problem]) -> str:
    counts = Counter(p.kind for p in problems)
    head = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
    return f"{len(problems)} problem(s): {head}\n" + "\n".join(f"  - {p}" for p in problems)


def list_files(root: str, options: dict[str, Any]) -> dict[str, str]:
    """Every file under root -> {relative path: URL}, recursively; a Hugging Face dataset's rows as `<row>.png`."""
    if root.startswith(hub_rows.SCHEME):
        try:
            return hub_rows.list_rows(root.removeprefix(hub_rows.SCHEME), options["huggingface"])
        except Exception as err:  # noqa: BLE001 -- datasets/hub raise many types; each becomes a named problem
            name = options["huggingface"]["dataset_name"]
            raise DatasetError([Problem(kind="unreadable Hugging Face dataset", file=name, detail=f"{type(err).__name__}: {err}")]) from err
    fs, base = filesystem(root, options)
    if not fs.exists(base):
        raise DatasetError([Problem(kind="missing data directory", file=root)])
    prefix = "s3://" if root.startswith("s3://") else ""
    return {posixpath.relpath(path, base): prefix + path for path in fs.find(base)}


Listings = dict[str, dict[str, str]]  # a folder (data_root) -> list_files' answer: each folder is listed once a scan


def listed(dataset: DatasetConfig, listings: Listings) -> dict[str, str]:
    """`list_files` of the dataset's folder, from `listings` when this scan listed it already (an edit folder with
    several reference sets, the file report after pairing)."""
    if dataset.data_root not in listings:
        listings[dataset.data_root] = list_files(dataset.data_root, dataset.storage_options)
    return listings[dataset.data_root]


def images_by_stem(files: dict[str, str]) -> tuple[dict[str, str], dict[str, list[str]]]:
    """-> ({relative path without extension: image URL}, {such a name: its images} where several share one: pairs
    match by name without extension, so `a.png` beside `a.jpg` cannot be paired)."""
    urls: dict[str, list[str]] = {}
    for rel, url in sorted(files.items()):
        if rel.lower().endswith(IMAGE_EXTENSIONS):
            urls.setdefault(posixpath.splitext(rel)[0], []).append(url)
    return {stem: same[0] for stem, same in urls.items() if len(same) == 1}, {s: u for s, u in urls.items() if len(u) > 1}


def twin_problems(twins: dict[str, list[str]]) -> list[Problem]:
    return [Problem(kind="several images for one name", file=url, detail=f"{', '.join(u for u in same if u != url)} "
                    "too: pairs match by name without extension; rename or remove all but one")
            for same in twins.values() for url in same]


def case_hint(stem: str, others: dict[str, str]) -> str:
    """`; <url> differs only in case` when another side's name matches `stem` but for case (matching is exact)."""
    twins = [url for other, url in others.items() if other.lower() == stem.lower()]
    return f"; {twins[0]} differs only in case (names match exactly)" if twins else ""


def caption_source(dataset: DatasetConfig, stem: str, files: dict[str, str]) -> tuple[str, str | None]:
    """-> (caption text, caption file URL to read instead or None). textfile captions sit beside the image."""
    strategy = dataset.caption_strategy
    if strategy == "textfile":
        return "", files.get(f"{stem}.txt", f"{dataset.data_root}/{stem}.txt (missing)")
    if strategy == "filename":
        return posixpath.basename(stem).replace("_", " ").strip(), None
    if strategy == "instanceprompt":
        return dataset.instance_prompt or "", None
    if strategy == "huggingface":
        try:
            return hub_rows.caption(dataset.hub, int(stem)), None
        except KeyError as err:
            raise DatasetError([Problem(kind="missing caption column", file=dataset.hub["dataset_name"], detail=err.args[0])]) from err
    return "", None


def match_pairs(edit: DatasetConfig, ref: DatasetConfig, listings: Listings, several: bool = False
                ) -> tuple[list[dict[str, Any]], list[Problem]]:
    """Edit and reference images paired by relative path without extension; orphans on either side reported.
    `several`: the edit dataset has several reference datasets; each pair's id then names its reference, and
    `group` (the edit's own id) lets each epoch train one of them (reader.plan_epoch)."""
    edit_files, ref_files = listed(edit, listings), listed(ref, listings)
    if ref.generator:  # made from the edit images themselves (generated.py)
        ref_files = {rel: generated.reference_url(ref.generator, url) for rel, url in ref_files.items()}
    (edits, edit_twins), (refs, ref_twins) = images_by_stem(edit_files), images_by_stem(ref_files)
    twins = {**edit_twins, **ref_twins}  # such a name is left out: the other side's image of it too
    problems = twin_problems(edit_twins) + ([] if ref.generator else twin_problems(ref_twins))  # generated: the same files
    problems += [Problem(kind="edit without reference", file=edits[s], detail=f"no {s}.* in {ref.data_root}{case_hint(s, refs)}")
                 for s in edits if s not in refs and s not in twins]
    problems += [Problem(kind="reference without edit", file=refs[s], detail=f"no {s}.* in {edit.data_root}{case_hint(s, edits)}")
                 for s in refs if s not in edits and s not in twins]
    rows = []
    for stem in (s for s in edits if s in refs):
        caption, caption_url = caption_source(edit, stem, edit_files)
        caption_dataset = edit.id
        if ref.caption_strategy is not None:  # the seed: reference captions replace the edit's
            (caption, caption_url), caption_dataset = caption_source(ref, stem, ref_files), ref.id
        group = f"{edit.id}/{stem}"
        rows.append(
            dict(
                sample_id=f"{group}@{ref.id}" if several else group, group=group, dataset_id=edit.id, ref_dataset_id=ref.id,
                edit_url=edits[stem], ref_url=refs[stem], caption=caption, caption_url=caption_url or "",
                caption_dataset_id=caption_dataset,
                repeats=edit.repeats,
            )
        )
    return rows, problems


def evaluation_rows(rows: list[dict[str, Any]], config: Config) -> list[dict[str, Any]]:
    """The pairs validation may edit, by sample id: those of `eval_dataset_id`, or every edit dataset's."""
    wanted = config.validation.dataset_id
    return sorted((r for r in rows if wanted is None or r["dataset_id"] == wanted), key=lambda r: r["sample_id"])


def discover_pairs(config: Config, listings: Listings | None = None) -> tuple[list[dict[str, Any]], list[Problem]]:
    """Every edit dataset against each of its reference datasets (all pairs are cached; with several reference
    datasets each epoch trains one pair per edit, SimpleTuner's `conditioning_multidataset_sampling: random`).
    `listings`: the folders listed so far in this scan (filled in)."""
    rows, problems, listings = [], [], {} if listings is None else listings
    for edit in config.data.edit_datasets():
        for ref_id in edit.conditioning_data:
            try:
                found, bad = match_pairs(edit, config.data.dataset(ref_id), listings, several=len(edit.conditioning_data) > 1)
            except DatasetError as err:
                found, bad = [], err.problems
            rows += found
            problems += bad
    return rows, list(dict.fromkeys(problems))  # an edit dataset with several reference sets is matched once per set


def read_bytes(url: str, options: dict[str, Any]) -> bytes:
    if url.startswith(generated.SCHEME):
        spec, edit_url = generated.parse(url)
        return generated.generate(spec, read_bytes(edit_url, options))
    if url.startswith(hub_rows.SCHEME):
        return hub_rows.read_image_bytes(url, options["huggingface"])
    fs, path = filesystem(url, options)  # fsspec caches filesystem instances: cheap per call
    return fs.cat_file(path)


BELOW_MINIMUM = "image below minimum size"
# mixed into the digest of an image whose decoding turns or rescales it: entries cached before images were decoded
# upright and 8-bit (when a rotated photo trained sideways, a 16-bit one white) are encoded again
UPRIGHT_RGB = "upright-rgb-8bit"


def meets_minimum(width: int, height: int, minimum: float, resolution_type: str) -> bool:
    """SimpleTuner's `minimum_image_size` in the unit of the dataset's `resolution_type`: `pixel` both edges,
    `pixel_area` the area of a minimum x minimum square, `area` megapixels. 0/None: no minimum."""
    if not minimum:
        return True
    if resolution_type == "pixel":
        return min(width, height) >= minimum
    return width * height >= (minimum * 1e6 if resolution_type == "area" else minimum**2)


def minimum_text(minimum: float, resolution_type: str) -> str:
    return {"pixel": f"an edge below {minimum:g} px", "area": f"under {minimum:g} megapixels"}.get(
        resolution_type, f"under {minimum:g}x{minimum:g} px of area")


def decode_image(url: str, options: dict[str, Any], minimum: float = 0,
                 resolution_type: str = "pixel_area") -> tuple[Image.Image | None, str, list[Problem]]:
    """-> (upright 8-bit RGB image or None, sha256 of the bytes, problems). Decodes fully, so truncated files are
    caught (longcat_ray/images.py says how every image is decoded)."""
    try:
        data = read_bytes(url, options)
    except OSError as err:
        return None, "", [Problem(kind="unreadable image", file=url, detail=str(err))]
    if not data:
        return None, "", [Problem(kind="unreadable image", file=url, detail="0 bytes")]
    digest = hashlib.sha256(data).hexdigest()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
            image, changed = upright_rgb(image)
    except Exception as err:  # noqa: BLE001 -- PIL raises many types for corrupt data
        return None, digest, [Problem(kind="unreadable image", file=url, detail=f"{type(err).__name__}: {err}")]
    if changed:  # the cache keys on this digest: an image decoded differently than before must not reuse old entries
        digest = hashlib.sha256(f"{digest} {UPRIGHT_RGB}".encode()).hexdigest()
    if not meets_minimum(image.width, image.height, minimum, resolution_type):
        detail = f"{image.width}x{image.height}, {minimum_text(minimum, resolution_type)}: left out, as SimpleTuner does"
        return None, digest, [Problem(kind=BELOW_MINIMUM, file=url, detail=detail)]
    return image, digest, []


def read_caption(row: dict[str, Any], options: dict[str, Any]) -> tuple[str, list[Problem]]:
    url = row["caption_url"]
    if not url:
        return row["caption"], []
    if url.endswith("(missing)"):
        return "", [Problem(kind="missing caption", file=url.removesuffix(" (missing)"), detail=f"for {row['edit_url']}")]
    try:
        text = read_bytes(url, options).decode("utf-8").strip()
    except UnicodeDecodeError as err:
        return "", [Problem(kind="undecodable caption", file=url, detail=f"not UTF-8: {err.reason} at byte {err.start}")]
    except OSError as err:
        return "", [Problem(kind="missing caption", file=url, detail=str(err))]
    if not text:  # an edit without an instruction is what caption dropout makes on purpose, never by accident
        return "", [Problem(kind="empty caption", file=url, detail=f"for {row['edit_url']}: write its instruction, or remove the pair")]
    return text, []


SMALLER_REFERENCE = 8  # a reference this many times narrower and shorter than its edit is most likely not its source


def size_mismatch(row: dict[str, Any], edit: Image.Image | None, ref: Image.Image | None) -> list[Problem]:
    """A reference far smaller than its edit (both sides under 1/SMALLER_REFERENCE): training would scale it up that
    much to the edit's bucket, so it is more likely another image than this edit's source."""
    if edit is None or ref is None or not (ref.width * SMALLER_REFERENCE < edit.width and ref.height * SMALLER_REFERENCE < edit.height):
        return []
    return [Problem(kind="reference much smaller than its edit", file=row["ref_url"],
                    detail=f"{ref.width}x{ref.height} against {edit.width}x{edit.height} ({row['edit_url']}): check that they "
                           "are one pair, or give the reference at a size nearer its edit's")]


def check_pair(row: dict[str, Any], plan: dict[str, Any]) -> dict[str, Any]:
    """Read both images and the caption once: validity, content hashes, bucket. `plan` holds per-dataset
    storage options, minimum sizes and target areas."""
    edit_opts, ref_opts = plan["options"][row["dataset_id"]], plan["options"][row["ref_dataset_id"]]
    minimum, unit = plan["minimum"][row["dataset_id"]], plan["resolution_type"][row["dataset_id"]]
    edit, edit_sha, problems = decode_image(row["edit_url"], edit_opts, minimum, unit)
    ref, ref_sha, ref_problems = decode_image(row["ref_url"], ref_opts)  # references have no minimum (SimpleTuner's rule)
    caption, caption_problems = read_caption(row, plan["options"][row["caption_dataset_id"]])
    problems += ref_problems + caption_problems + size_mismatch(row, edit, ref)
    width, height = edit.size if edit else (0, 0)
    bucket = bucket_for(width, height, plan["area"][row["dataset_id"]]) if edit else (0, 0)
    return {
        **row, "caption": caption, "edit_sha": edit_sha, "ref_sha": ref_sha, "width": width, "height": height,
        "bucket_w": bucket[0], "bucket_h": bucket[1], "problems": json.dumps([p.__dict__ for p in problems]),
    }


def scan_plan(config: Config) -> dict[str, Any]:
    datasets = [d for d in config.data.datasets if d.dataset_type in ("image", "conditioning")]
    return {
        "options": {d.id: d.storage_options for d in datasets},
        "minimum": {d.id: d.minimum_image_size or config.data.minimum_image_size for d in datasets},
        "resolution_type": {d.id: d.resolution_type for d in datasets},
        "area": {d.id: d.target_area for d in datasets},
    }


def scan_pairs(rows: list[dict[str, Any]], plan: dict[str, Any]) -> list[dict[str, Any]]:
    """check_pair over every row in Ray Data tasks (I/O bound: images are read where the tasks run)."""
    import ray

    return ray.data.from_items(rows).map(check_pair, fn_kwargs={"plan": plan}).take_all()


def prepare_pairs(config: Config) -> tuple[list[dict[str, Any]], list[Problem], dict[str, str]]:
    """-> (good pairs sorted by bucket then id, every problem, `file_report`). Raises DatasetError on any problem
    unless `skip_bad_pairs` is set, in which case the bad pairs are left out and still returned as problems. Edits
    below `minimum_image_size` are always left out (SimpleTuner excludes them) and returned as problems."""
    listings: Listings = {}
    rows, problems = discover_pairs(config, listings)
    good = []
    for row in scan_pairs(rows, scan_plan(config)) if rows else []:
        found = [Problem(**p) for p in json.loads(row.pop("problems"))]
        problems += found
        if not found:
            good.append(row)
    if any(p.kind != BELOW_MINIMUM for p in problems) and not config.data.skip_bad_pairs:
        raise DatasetError(problems)
    if not good:
        raise DatasetError(problems or [Problem(kind="no pairs", file=", ".join(d.data_root for d in config.data.edit_datasets()))])
    good.sort(key=lambda r: (r["bucket_w"], r["bucket_h"], r["sample_id"]))
    return good, problems, file_report(config, good, problems, listings)


USED = "used"


def file_report(config: Config, good: list[dict[str, Any]], problems: list[Problem], listings: Listings) -> dict[str, str]:
    """Every file under the image datasets' folders, once -> what became of it: `used` (an image or caption of a pair
    that trains), `error: <problem>` (named in the report), or `skipped: <why>`. Folders come from `listings` (the
    pairing's); one it could not list is a problem of its own, and left out here."""
    used = {row[key] for row in good for key in ("edit_url", "ref_url", "caption_url") if row[key]}
    named: dict[str, str] = {}
    for problem in problems:
        named.setdefault(problem.file, problem.kind)
    report: dict[str, str] = {}
    for dataset in config.data.datasets:
        if dataset.dataset_type not in ("image", "conditioning") or dataset.disabled or dataset.generator or \
                dataset.data_root.startswith(hub_rows.SCHEME):
            continue
        for rel, url in listings.get(dataset.data_root, {}).items():
            report.setdefault(url, file_fate(url, rel, dataset, used, named))
    return report


def file_fate(url: str, rel: str, dataset: DatasetConfig, used: set[str], named: dict[str, str]) -> str:
    if url in used:
        return USED
    if url in named:
        return f"skipped: {named[url]}" if named[url] == BELOW_MINIMUM else f"error: {named[url]}"
    if rel.lower().endswith(IMAGE_EXTENSIONS):
        return "skipped: its pair is left out (another of its files has a problem)"
    if dataset.caption_strategy != "textfile":
        return "skipped: not an image" + (f" (captions: {dataset.caption_strategy})" if dataset.caption_strategy else "")
    return "skipped: a caption of a pair left out, or of no image" if rel.endswith(".txt") else "skipped: not an image or caption"


def count_fates(report: dict[str, str]) -> str:
    """-> `N files: U used, S skipped, E error` (the reasons are the report's problems)."""
    counts = Counter(fate.split(":")[0] for fate in report.values())
    return f"{len(report)} files: " + ", ".join(f"{counts[k]} {k}" for k in (USED, "skipped", "error"))
