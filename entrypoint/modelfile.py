"""Choose the chat template and stop tokens, and render the Modelfile (and the matching create request).

Detection reads only the checkpoint's own files (its Jinja chat template and special tokens), never
its repo id. The Modelfile and the API create request come from one ModelSpec, so the artifact a user
downloads describes exactly the model that was pushed.
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

import jinja2

from . import chat_jinja, github, hub
from .errors import InputError, RepoRefused

TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "templates"


@dataclasses.dataclass(frozen=True)
class ChatFormat:
    """An Ollama template: the Go template, the tokens that end a turn, those that begin one, and the
    system prompt the checkpoint's own template inserts when a conversation has none."""
    name: str
    template: str
    end_of_turn: tuple[str, ...]
    begin_of_turn: tuple[str, ...]
    default_system: str = ""
    family: str = ""  # the catalog family it is or resembles, "" if none
    supports_system: bool = True  # False: the checkpoint's template refuses or drops system messages
    renderer: str = ""  # Ollama's built-in RENDERER, which then writes the prompts instead of `template`
    parser: str = ""  # the renderer's PARSER
    leading_bos: str = ""  # the BOS text the renderer writes first (renderers.toml)
    # A derived template writes default_system itself, in a chat without a system message, as the Jinja
    # does. A SYSTEM line would make Ollama send it as a system message, which the GGUF's Jinja (when
    # Ollama renders that) may render otherwise than its own default (Granite 4.0 with tools, say).
    writes_default_system: bool = False

    def system_prompt(self, system_input: str) -> str:
        """The Modelfile's SYSTEM: the system input, else the default system prompt the template lacks."""
        return system_input or ("" if self.writes_default_system else self.default_system)


@dataclasses.dataclass(frozen=True)
class Family:
    """A catalog entry of templates/chat/catalog.toml (its comments explain the fields)."""
    name: str
    applies_to: str
    end_of_turn: tuple[str, ...]
    begin_of_turn: tuple[str, ...]
    markers: tuple[str, ...]
    model_types: tuple[str, ...]
    verified_with: tuple[str, ...]
    default_system: str

    def chat_format(self) -> ChatFormat:
        text = (TEMPLATES_DIR / "chat" / f"{self.name}.gotmpl").read_text(encoding="utf-8")
        # Files end with a newline for editors; the template must not emit it after the last turn.
        return ChatFormat(name=f"{self.name} (catalog)", template=text.removesuffix("\n"),
                          end_of_turn=self.end_of_turn, begin_of_turn=self.begin_of_turn,
                          default_system=self.default_system, family=self.name)


@dataclasses.dataclass(frozen=True)
class Renderer:
    """An entry of templates/chat/renderers.toml: one of Ollama's built-in renderers (its comments explain
    the fields)."""
    name: str
    applies_to: str
    parser: str
    markers: tuple[str, ...]
    leading_bos: str
    end_of_turn: tuple[str, ...]
    begin_of_turn: tuple[str, ...]
    verified_with: tuple[str, ...]

    def chat_format(self) -> ChatFormat:
        return ChatFormat(name=f"{self.name} (Ollama's built-in renderer)", template="", end_of_turn=self.end_of_turn,
                          begin_of_turn=self.begin_of_turn, renderer=self.name, parser=self.parser,
                          leading_bos=self.leading_bos)


def _load_catalog() -> dict[str, Family]:
    with open(TEMPLATES_DIR / "chat" / "catalog.toml", "rb") as file:
        tables = tomllib.load(file)
    return {name: Family(name=name, applies_to=t["applies_to"], end_of_turn=tuple(t["end_of_turn"]),
                         begin_of_turn=tuple(t["begin_of_turn"]), markers=tuple(t["markers"]),
                         model_types=tuple(t.get("model_types", ())), verified_with=tuple(t["verified_with"]),
                         default_system=t.get("default_system", ""))
            for name, t in tables.items()}


def _load_renderers() -> dict[str, Renderer]:
    with open(TEMPLATES_DIR / "chat" / "renderers.toml", "rb") as file:
        tables = tomllib.load(file)
    return {name: Renderer(name=name, applies_to=t["applies_to"], parser=t["parser"], markers=tuple(t["markers"]),
                           leading_bos=t["leading_bos"], end_of_turn=tuple(t["end_of_turn"]),
                           begin_of_turn=tuple(t["begin_of_turn"]), verified_with=tuple(t["verified_with"]))
            for name, t in tables.items()}


FAMILIES = _load_catalog()
RENDERERS = _load_renderers()


def load_family(name: str) -> ChatFormat:
    return FAMILIES[name].chat_format()


@dataclasses.dataclass(frozen=True)
class TokenizerInfo:
    chat_template: str  # Jinja, "" if the checkpoint has none
    eos_tokens: tuple[str, ...]  # from tokenizer_config and generation_config, in that order
    bos_token: str
    special_tokens: tuple[str, ...] = ()
    model_type: str = ""  # config.json's model_type
    # Where the chat template came from (a file, or the GGUF's metadata): for messages, not a fact compared.
    template_file: str = dataclasses.field(default="", compare=False)


def _has_markers(info: TokenizerInfo, markers: tuple[str, ...]) -> bool:
    return bool(markers) and all(marker in info.chat_template for marker in markers)


def _specificity(markers: tuple[str, ...]) -> tuple[int, int]:
    """How specific a set of markers is: more markers, then more text."""
    return len(markers), sum(map(len, markers))


def detect_family(info: TokenizerInfo, families: dict[str, Family] | None = None) -> Family | None:
    """The catalog family of a checkpoint, from its own files only: every marker of the family appears
    in its Jinja chat template. Among several, the most specific wins, then one that lists config.json's
    model_type."""
    candidates = [f for f in (families or FAMILIES).values() if _has_markers(info, f.markers)]
    if not candidates:
        return None
    return max(candidates, key=lambda f: (*_specificity(f.markers), info.model_type in f.model_types))


def _token_text(value: Any) -> str:
    # tokenizer_config stores special tokens as strings or as {"content": ...} objects.
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return str(value or "")


def _read_json(path: Path) -> dict[str, Any]:
    return hub.read_json(path) if path.exists() or path.is_symlink() else {}


def read_tokenizer_info(checkpoint: Path, base: Path | None = None) -> TokenizerInfo:
    """Collect the chat template and special tokens from a checkpoint folder. `base`: a LoRA adapter's base
    model, whose generation_config.json (its end-of-turn tokens, among them) the merged model keeps when
    the adapter has none. A file with values of other types than its format has is refused, named."""
    config = _read_json(checkpoint / "tokenizer_config.json")
    template: Any = ""
    template_file = "tokenizer_config.json"
    for name in ("chat_template.jinja", "chat_template.json"):
        if (checkpoint / name).exists():
            template_file = name
            break
    with hub.reading(template_file):
        if template_file == "chat_template.jinja":
            template = hub.read_text(checkpoint / template_file)
        else:
            template = (config if template_file == "tokenizer_config.json"
                        else _read_json(checkpoint / template_file)).get("chat_template", "")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template", "") for t in template}
            template = named.get("default", next(iter(named.values()), ""))
        if not isinstance(template, str):
            raise TypeError(f"chat_template is a {type(template).__name__}, not text")

    id_to_token, special = {}, []
    with hub.reading("tokenizer.json"):
        for token in _read_json(checkpoint / "tokenizer.json").get("added_tokens", []):
            id_to_token[int(token["id"])] = str(token["content"])
            if token.get("special"):
                special.append(str(token["content"]))
    with hub.reading("tokenizer_config.json"):
        for token_id, token in config.get("added_tokens_decoder", {}).items():
            id_to_token[int(token_id)] = _token_text(token)
            if isinstance(token, dict) and token.get("special"):
                special.append(_token_text(token))
        eos: list[str] = []
        if _token_text(config.get("eos_token")):
            eos.append(_token_text(config.get("eos_token")))
        bos_token = _token_text(config.get("bos_token"))
    generation = checkpoint / "generation_config.json"
    if not generation.is_file() and base is not None:
        generation = base / "generation_config.json"
    with hub.reading(generation.name):
        generation_eos = _read_json(generation).get("eos_token_id")
        for token_id in generation_eos if isinstance(generation_eos, list) else [generation_eos]:
            if token_id is not None and token_id in id_to_token:
                eos.append(id_to_token[token_id])
    return TokenizerInfo(chat_template=template, eos_tokens=tuple(dict.fromkeys(eos)), bos_token=bos_token,
                         special_tokens=tuple(dict.fromkeys(special)),
                         model_type=str(_read_json(checkpoint / "config.json").get("model_type", "")),
                         template_file=template_file if template else "")


# llama.cpp's token types (gguf-py TokenType): CONTROL marks the tokenizer's special tokens.
_CONTROL_TOKEN = 3


def tokenizer_info_from_gguf(metadata: dict[str, Any]) -> TokenizerInfo:
    """The same facts as read_tokenizer_info, from a GGUF's metadata (gguf_header.read_metadata)."""
    tokens: list[str] = metadata.get("tokenizer.ggml.tokens", [])
    types: list[int] = metadata.get("tokenizer.ggml.token_type", [])

    def token(key: str) -> str:
        token_id = metadata.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[token_id] if isinstance(token_id, int) and 0 <= token_id < len(tokens) else ""

    # EOS first (as in tokenizer_config), then the end-of-turn and end-of-message tokens when set apart.
    eos = [t for t in (token("eos"), token("eot"), token("eom")) if t]
    # A GGUF may omit the token types: then no token is known to be a control token.
    control = tuple(t for t, k in zip(tokens, types, strict=False) if k == _CONTROL_TOKEN)
    template = str(metadata.get("tokenizer.chat_template", ""))
    return TokenizerInfo(chat_template=template, eos_tokens=tuple(dict.fromkeys(eos)), bos_token=token("bos"),
                         special_tokens=control, model_type=str(metadata.get("general.architecture", "")),
                         template_file="the GGUF's tokenizer.chat_template" if template else "")


def _derive(info: TokenizerInfo, bos_added: bool) -> tuple[chat_jinja.Derived | None, str]:
    """The Ollama template read off the checkpoint's chat template, or None and why not."""
    if not info.chat_template:
        return None, "the checkpoint has no chat template"
    try:
        return chat_jinja.derive(info.chat_template, bos_token=info.bos_token, eos_token=(info.eos_tokens or ("",))[0],
                                 special_tokens=info.special_tokens, bos_added=bos_added), ""
    except chat_jinja.CannotDerive as exc:
        return None, str(exc)


def choose_format(template_input: str, info: TokenizerInfo, workspace: Path, bos_added: bool = False,
                  derivation: tuple[chat_jinja.Derived | None, str] | None = None) -> ChatFormat:
    """`template` input: 'auto' detects from the checkpoint, a family name picks one, a path loads a Go template.
    bos_added: the GGUF's tokenizer prepends BOS itself (then a derived template must not write it).
    derivation: _derive's result, when the caller has it."""
    if template_input != "auto" and template_input not in FAMILIES:  # settings checked that the file exists
        path = workspace / template_input
        # A user's own template: stop on the checkpoint's EOS tokens only.
        return ChatFormat(name=f"file:{template_input}", template=path.read_text(encoding="utf-8").removesuffix("\n"),
                          end_of_turn=(), begin_of_turn=())
    derived, why_not = derivation or _derive(info, bos_added)
    if template_input in FAMILIES:
        chosen = load_family(template_input)
        # The checkpoint's own default system prompt (a fine-tune's, say) beats the family's.
        return dataclasses.replace(chosen, default_system=derived.default_system) if derived else chosen
    if not info.chat_template:
        raise RepoRefused("The checkpoint has no chat template (chat_template in tokenizer_config.json or "
                          "chat_template.jinja). Set the template input to a catalog template or a Go template "
                          "file.", input_name="template", title="No chat template")
    family = detect_family(info)
    if derived is None:
        if family is not None:  # the catalog's template for the family; the parity check proves it
            github.log(f"no Ollama template can be derived from the checkpoint's chat template ({why_not}); it has "
                       f"the markers of the {family.name} family")
            return family.chat_format()
        raise RepoRefused(f"The checkpoint's chat template matches no catalog family ({', '.join(FAMILIES)}) and "
                          f"no Ollama template can be derived from it: {why_not}. Set the template input to a "
                          "catalog template or a Go template file in your repository.", input_name="template",
                          title="Unknown chat template")
    # Derived from the checkpoint's own template (and proven by the parity check) beats a catalog
    # entry: real templates of one family differ in details (thinking tags, tool preambles, dates,
    # a fine-tune's own default system prompt). `template: <family>` picks the catalog entry instead,
    # with tool calling where the family has it.
    detected = f" ({family.name} family)" if family is not None else ""
    return ChatFormat(name=f"derived from the checkpoint's chat template{detected}", template=derived.go_template,
                      end_of_turn=derived.end_of_turn, begin_of_turn=derived.begin_of_turn,
                      default_system=derived.default_system, writes_default_system=True,
                      family=family.name if family else "",
                      supports_system=derived.supports_system)


def matching_renderers(info: TokenizerInfo) -> list[Renderer]:
    """Ollama's built-in renderers whose markers all appear in the checkpoint's Jinja template, the most
    specific first (as detect_family ranks families)."""
    found = [r for r in RENDERERS.values() if _has_markers(info, r.markers)]
    return sorted(found, key=lambda r: _specificity(r.markers), reverse=True)


def candidate_formats(template_input: str, info: TokenizerInfo, workspace: Path, bos_added: bool = False,
                      caps: chat_jinja.Capabilities | None = None) -> list[ChatFormat]:
    """The renderings to try, in order, until one proves itself in Ollama. For `auto`: the built-in
    renderers the template matches (they write and parse the family's tools and thinking), then
    choose_format's (a derived TEMPLATE, which writes neither, and the GGUF's Jinja, which Ollama may
    prefer), then the detected family's catalog template (tools and thinking where the family has them);
    when no TEMPLATE can be derived and the checkpoint's template has tools or thinking (`caps`, found by
    rendering when not given), the GGUF's Jinja alone last (jinja_format). Otherwise only choose_format's."""
    if template_input != "auto":
        return [choose_format(template_input, info, workspace, bos_added)]
    renderers = [r.chat_format() for r in matching_renderers(info)]
    derivation = _derive(info, bos_added)
    if caps is None and info.chat_template:
        caps = chat_jinja.capabilities(info.chat_template, bos_token=info.bos_token,
                                       eos_token=(info.eos_tokens or ("",))[0])
    # No TEMPLATE can be derived, and the checkpoint's template has tools or thinking: only the Jinja carries them.
    jinja = [jinja_format(info)] if derivation[0] is None and caps is not None and caps.names() else []
    try:
        first = choose_format(template_input, info, workspace, bos_added, derivation)
    except RepoRefused:
        if renderers or jinja:  # no TEMPLATE for this template: Ollama may still render it
            return renderers + jinja
        raise
    formats = [*renderers, first]
    family = detect_family(info)
    if family is not None and first.name != family.chat_format().name:
        formats.append(dataclasses.replace(family.chat_format(), default_system=first.default_system))
    return formats + jinja


JINJA_FORMAT_NAME = "the checkpoint's own Jinja chat template (no TEMPLATE)"


def jinja_format(info: TokenizerInfo) -> ChatFormat:
    """No TEMPLATE: Ollama renders the prompts with the GGUF's own Jinja chat template, in llama-server, with
    its tools and thinking. For a template no TEMPLATE can be read off (today's date in a form Go templates
    cannot write, say). The detected family's turn tokens, if any, are the stop tokens."""
    family = detect_family(info)
    return ChatFormat(name=JINJA_FORMAT_NAME, template="",
                      end_of_turn=family.end_of_turn if family else (),
                      begin_of_turn=family.begin_of_turn if family else (), family=family.name if family else "")


# generation_config.json's sampling fields and the Ollama parameters they become.
SAMPLING_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                   "repetition_penalty": "repeat_penalty"}


def sampling_defaults(checkpoint: Path, base: Path | None = None) -> tuple[tuple[str, float | int], ...]:
    """The checkpoint's own sampling defaults (generation_config.json, else a LoRA base's), as Ollama
    parameters. transformers samples with them only when do_sample is true; otherwise it decodes greedily
    and they mean nothing, so none are taken."""
    path = checkpoint / "generation_config.json"
    if not path.is_file() and base is not None:
        path = base / "generation_config.json"
    config = _read_json(path)
    if config.get("do_sample") is not True:
        return ()
    return tuple((parameter, config[field]) for field, parameter in SAMPLING_FIELDS.items()
                 if isinstance(config.get(field), int | float) and not isinstance(config.get(field), bool))


def stop_tokens(chat_format: ChatFormat, info: TokenizerInfo) -> tuple[str, ...]:
    """End-of-turn tokens plus EOS tokens, never a token that also begins a turn (it would cut answers)."""
    candidates = list(chat_format.end_of_turn) + list(info.eos_tokens)
    return tuple(t for t in dict.fromkeys(candidates) if t and t not in chat_format.begin_of_turn)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    template: str
    system: str
    parameters: tuple[tuple[str, Any], ...]
    license: str
    source: str
    parser: str = ""  # PARSER: with a TEMPLATE, it pins the TEMPLATE (checks.PINNED)
    renderer: str = ""  # RENDERER: Ollama's built-in one writes the prompts (checks.RENDERER)


def _quote(value: str) -> str:
    # Modelfile strings have no escapes: "..." for one line without quotes, else """...""", which
    # cannot hold """ nor end with " (the closing quotes would be read early).
    if '"""' in value or value.endswith('"'):
        raise InputError('A Modelfile value cannot contain """ or end with a double quote; reword the system '
                         "prompt or template.", input_name="system")
    if "\n" in value or '"' in value:
        return f'"""{value}"""'
    return f'"{value}"'


def render_modelfile(spec: ModelSpec, gguf_name: str, projector_name: str = "") -> str:
    """projector_name: a vision model's projector GGUF, its second FROM."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES_DIR), autoescape=False,
                             undefined=jinja2.StrictUndefined)
    env.filters["quote"] = _quote
    return env.get_template("Modelfile.j2").render(
        source=spec.source, gguf_name=gguf_name, projector_name=projector_name,
        template=spec.template, system=spec.system, parameters=spec.parameters, license=spec.license,
        parser=spec.parser, renderer=spec.renderer)


def create_request(spec: ModelSpec, model: str, gguf_digest: str, gguf_name: str,
                   projector: tuple[str, str] | None = None) -> dict[str, Any]:
    """The /api/create body equivalent to render_modelfile(spec, gguf_name, ...); projector is (file name,
    digest)."""
    parameters: dict[str, Any] = {}
    for name, value in spec.parameters:
        if name == "stop":
            parameters.setdefault("stop", []).append(value)
        else:
            parameters[name] = value
    body: dict[str, Any] = {"model": model, "files": {gguf_name: gguf_digest}}
    if projector:  # Ollama stores a GGUF with a vision encoder and no text blocks as the projector layer
        body["files"][projector[0]] = projector[1]
    if spec.template:  # an embedding model has none
        body["template"] = spec.template
    if spec.renderer:
        body["renderer"] = spec.renderer
    if spec.parser:
        body["parser"] = spec.parser
    if spec.system:
        body["system"] = spec.system
    if parameters:
        body["parameters"] = parameters
    if spec.license:
        body["license"] = spec.license
    return body


def read_license(checkpoint: Path) -> str:
    for name in ("LICENSE", "LICENSE.md", "LICENSE.txt", "LICENCE", "LICENCE.md", "LICENCE.txt"):
        if (checkpoint / name).exists() or (checkpoint / name).is_symlink():
            return hub.read_text(checkpoint / name, errors="replace").strip()
    return ""
