"""A `generate` run's extra networks: every LoRA and embedding its prompts name, found and checked against the
model before it loads (so a wrong one costs nothing), and what each image records of them. Torch-free to import."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sdcli.networks.library import folders
from sdcli.networks.tags import other_tags, parse_lora_option, strip_tags

if TYPE_CHECKING:
    from sdcli.batch import Request


def prepare_networks(requests: list[Request], settings: dict, checkpoint) -> tuple:
    """-> (networks.loras.Loras, networks.embeddings.Embeddings or None without embedding folders): the LoRAs
    read and matched against the model's weight names and shapes, the embeddings the prompts use read and
    checked against every text encoder's width."""
    from sdcli.networks.loras import Loras, uses_of

    given = tuple(dict.fromkeys(parse_lora_option(entry).name for r in requests for entry in r.lora))
    loras = Loras(folders(settings.get("lora_dir"), "SDCLI_LORA_DIR", "--lora-dir"), given)
    uses = [u for r in requests for u in uses_of(r.prompt, r.negative_prompt)]
    if uses:
        loras.prepare(uses, checkpoint.meta_model(), checkpoint.config.variant)
    embedding_dirs = folders(settings.get("embeddings_dir"), "SDCLI_EMBEDDINGS_DIR", "--embeddings-dir")
    if not embedding_dirs:
        return loras, None
    from sdcli.networks import encoder_roles
    from sdcli.networks.embeddings import Embeddings

    embeddings = Embeddings(embedding_dirs)
    cfg = checkpoint.config
    for name in dict.fromkeys(n for r in requests for n in _embeddings_used(embeddings, r)):
        for role, text in zip(encoder_roles(cfg), cfg.texts, strict=True):  # SDXL: each encoder's tensor
            embeddings.vectors(name, text.width, role, cfg.variant)
    return loras, embeddings


def ignored_tags(requests: list[Request]) -> list[str]:
    """The extra-network tags other than LoRAs that the prompts hold (A1111's <hypernet:...>), each kind once."""
    kinds: dict[str, str] = {}
    for r in requests:
        for tag in other_tags(r.prompt) + other_tags(r.negative_prompt):
            kinds.setdefault(tag[1:].split(":", 1)[0], tag[:40])
    return list(kinds.values())


def network_record(engine, r: Request) -> dict:
    """A1111's "Lora hashes" and "TI hashes" of the LoRAs and embeddings the request's prompts use."""
    from sdcli.networks.loras import uses_of

    record = {}
    if uses := uses_of(r.prompt, r.negative_prompt):
        record["lora_hashes"] = {_hash_name(k): v for k, v in engine.loras.hashes(uses).items()}
    if engine.embeddings is not None and (names := _embeddings_used(engine.embeddings, r)):
        record["ti_hashes"] = {_hash_name(n): engine.embeddings.short_hash(n) for n in dict.fromkeys(names)}
    return record


def _embeddings_used(embeddings, r: Request) -> list[str]:
    """The embeddings of both prompts, in the words the text encoder sees (the tags taken out)."""
    return [n for text in (r.prompt, r.negative_prompt) for n in embeddings.used(strip_tags(text))]


def _hash_name(name: str) -> str:
    """A name as A1111 writes it in "Lora hashes" and "TI hashes": without the ':' and ',' that separate them."""
    return name.translate(str.maketrans("", "", ":,"))
