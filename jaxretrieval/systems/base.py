"""What a system is: one class that says how a config becomes a model, a loss, batches and metrics.

The train loop (`jaxretrieval.train`), the evaluator (`jaxretrieval.evaluate`), the model factory
(`jaxretrieval.models`) and the config checks ask the system of `config.system` for each of these, so a new
system is one file in this folder (see README "Adding a system"). Subclasses override what differs; the
defaults are those of a dual encoder trained on captions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from flax import nnx

if TYPE_CHECKING:
    import optax
    from jax.sharding import Mesh

    from jaxretrieval.config import Config
    from jaxretrieval.retrieval.rerank import CrossEncoder
    from jaxretrieval.tasks import Task

# (params, batch, key) -> (loss, metrics to log, grads, new non-trainable state or None)
GradFn = Callable[[Any, dict, Any], tuple[Any, dict, Any, Any]]
# (graphdef, params, mesh) -> metrics
Evaluator = Callable[[nnx.GraphDef, Any, "Mesh"], dict[str, Any]]
Check = tuple[bool, str]


class System:
    name: ClassVar[str]
    summary: ClassVar[str] = ""
    families: ClassVar[tuple[str, ...]]  # model.family values (architectures) it builds on
    losses: ClassVar[tuple[str, ...]]  # train.loss values it trains with; the first is the default
    protocols: ClassVar[tuple[str, ...]]  # eval.protocol values; the first is the default
    data_kinds: ClassVar[tuple[str, ...]]  # data.kind values it reads
    converters: ClassVar[tuple[str, ...]] = ()  # `python -m convert NAME` that write its checkpoints
    Section: ClassVar[type | None] = None  # a dataclass of its own settings, the config key of its name
    # Keys the system took from the shared sections into its own: old dotted key -> new; old configs keep working.
    moved_keys: ClassVar[dict[str, str]] = {}
    reranks: ClassVar[bool] = False  # has a cross-encoder (`cross_encoder`) for eval.rerank_k

    def check(self, config: Config) -> list[Check]:
        """(holds, message naming the keys) for every rule of this system's settings."""
        return []

    def build(self, config: Config, *, rngs: nnx.Rngs, dtype: Any) -> nnx.Module:
        """The model, parameters in fp32, computing in `dtype`."""
        raise NotImplementedError

    def layer_depth(self, config: Config) -> tuple[Callable[[str], int], int] | None:
        """(parameter path -> depth, the top depth) for layer-wise lr decay (train.layer_decay); None: none."""
        return None

    def lr_scale(self, config: Config) -> Callable[[str], Any] | None:
        """Parameter path -> learning-rate factor (a number, or one per layer of a stacked parameter), e.g. X-VLM's
        lr_mult groups; None: every parameter at train.lr."""
        return None

    def param_role(self, name: str) -> str:
        """The optimiser role of a trainable parameter ("/"-joined path): "param", or a role of
        `role_optimizers`. Non-trainable leaves (batch statistics, frozen values) are always "state"."""
        return "param"

    def role_optimizers(self, config: Config) -> dict[str, optax.GradientTransformation]:
        """Optimisers of the roles besides "param" and "state"."""
        return {}

    def grad_fn(self, config: Config, graphdef: nnx.GraphDef, mesh: Mesh) -> GradFn:
        raise NotImplementedError

    def before_step(self, config: Config) -> Callable[[Any], Any] | None:
        """params -> params, applied in the train step before the gradient (e.g. clamping temperatures in place, as
        an original does at the start of its forward); None: nothing."""
        return None

    def task(self, config: Config, init_meta: dict) -> Task:
        """Training data, evaluation and checkpoint metadata; `init_meta`: train.init_from's metadata."""
        from jaxretrieval.tasks import image_text_task

        return image_text_task(config, init_meta, self)

    def record_fields(self, config: Config, source: Any) -> Callable[[Any], dict] | None:
        """Extra per-record batch fields (a picklable callable: record -> {name: array}) beside image, text, group."""
        return None

    def evaluator(self, config: Config, tokenizer: Any, source: Any = None) -> Evaluator:
        """The evaluation of eval.protocol on `source` (default the eval.split of the data)."""
        from jaxretrieval.tasks import image_text_evaluator

        return image_text_evaluator(config, tokenizer, source)

    def cross_encoder(self, config: Config, graphdef: nnx.GraphDef, mesh: Mesh) -> CrossEncoder | None:
        """The jitted functions the evaluator re-ranks with (eval.rerank_k); None: the system has none."""
        return None

    def inference(self, config: Config, meta: dict) -> tuple[Any, Any]:
        """(preprocess, tokenizer) that `jaxretrieval.load` returns with the model."""
        from jaxretrieval.data.pipeline import make_preprocess
        from jaxretrieval.data.tokenizers import build_tokenizer

        return make_preprocess(config), build_tokenizer(meta["tokenizer"])

    def init_from(self, config: Config, path: str, meta: dict, abstract: Any, fresh: Callable[[], Any]) -> Any:
        """The parameters train.init_from's checkpoint (metadata `meta`) gives: read straight into `abstract` (the
        sharded shapes), or, for a converted backbone marked partial, over `fresh()` parameters."""
        from jaxretrieval import checkpoint

        partial = bool(meta.get("partial"))
        params, _ = checkpoint.load_model(path, fresh() if partial else abstract, partial=partial)
        return params

    def __repr__(self) -> str:
        return f"<system {self.name}>"
