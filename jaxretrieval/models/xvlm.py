"""X-VLM / X2-VLM's retrieval model (the base of CFACK): a BEiT-2 vision tower, a BERT whose upper layers
cross-attend to the image tokens, ITC projections, an ITM head, an MLM head, a learnable temperature, and momentum
copies of the towers and projections.

Read in X2-VLM (github:zengyan-97/X2-VLM, models/xvlm.py `XVLMBase`) and CFACK (AIVIETNAMResearch/Pedestrian-Matching,
models/model_retrieval.py `CFACKCModel`):
- ITC features: L2-normalised `vision_proj(image_tokens[:, 0])` (token 0 is the mean-pooled patch token, see
  models/beit2.py) and `text_proj(text_hidden[:, 0])` (the [CLS] after the text layers).
- ITM: `itm_head(fuse(text_hidden, image_tokens)[:, 0])`, the head Linear(w, 2w), LayerNorm, GELU, Linear(2w, 2);
  the image attention mask is all ones.
- MLM: the whole BERT (text then fusion layers) over the masked ids, the head at the masked positions only.
- Momentum copies (CFACK: m = 0.995) of the vision tower, the text layers and both projections: `Momentum`
  variables, in the state (checkpointed, sharded like the online parameters) but never trained; the train step sets
  them to m * copy + (1 - m) * online before it computes the momentum features, as `_momentum_update` does at the top
  of the original's no-grad block. The original's momentum text encoder is a whole BERT whose fusion layers never run;
  ours holds only the embeddings and text layers.
- Optional CNN branch (CFACK `use_cnn_feats`): a ResNet on its own 224-px view, global-average pooled, Linear to the
  embedding width (timm's `resnet50` with num_classes = embed_dim), L2-normalised as the original does for a ResNet.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxretrieval.models.beit2 import Beit2
from jaxretrieval.models.bert import Bert, FusionHeads, ITMHead, MLMHead
from jaxretrieval.models.clip import l2_normalize
from jaxretrieval.models.layers import dense
from jaxretrieval.models.momentum import momentum_copy
from jaxretrieval.models.resnet import ResNet

MOMENTUM_PARTS = ("vision", "text", "vision_proj", "text_proj")


class XVLM(FusionHeads, nnx.Module):
    def __init__(self, *, vision: dict[str, Any], text: dict[str, Any], embed_dim: int, temp: float = 0.07,
                 itm_hidden: int | None = None, mlm: bool = True, momentum: bool = True,
                 cnn_layers: tuple[int, ...] | None = None, cnn_width: int = 64, pad_id: int = 0,
                 rngs: nnx.Rngs, dtype: Any = jnp.float32):
        """vision: Beit2 keyword arguments; text: Bert keyword arguments (fusion_from set); cnn_layers: the
        bottleneck blocks per stage of the CNN branch (None: no branch)."""
        self.pad_id = pad_id
        self.dtype = dtype
        self.vision = Beit2(**vision, rngs=rngs, dtype=dtype)
        width, text_width = vision["width"], text["width"]
        self.text = Bert(**text, encoder_width=width, pooler=False, rngs=rngs, dtype=dtype)
        self.vision_proj = dense(width, embed_dim, rngs=rngs, std=0.02, dtype=dtype)
        self.text_proj = dense(text_width, embed_dim, rngs=rngs, std=0.02, dtype=dtype)
        std = text.get("init_std", 0.02)
        self.itm_head = ITMHead(text_width, itm_hidden, rngs=rngs, dtype=dtype, init_std=std)
        self.mlm_head = (MLMHead(text_width, text.get("vocab_size", 30522), rngs=rngs, dtype=dtype, init_std=std)
                         if mlm else None)
        self.temp = nnx.Param(jnp.asarray(temp, jnp.float32))
        if cnn_layers is not None:
            self.cnn = ResNet(layers=tuple(cnn_layers), width=cnn_width, last_stride=2, stem_relu=True, rngs=rngs,
                              dtype=dtype)
            self.cnn_proj = dense(self.cnn.features, embed_dim, rngs=rngs, std=0.02, dtype=dtype)
        else:
            self.cnn = self.cnn_proj = None
        if momentum:
            layers = text["layers"] if text.get("fusion_from") is None else text["fusion_from"]
            text_copy = Bert(**{**text, "layers": layers, "fusion_from": layers}, encoder_width=width, pooler=False,
                             rngs=nnx.Rngs(0), dtype=dtype)
            text_copy.embeddings, text_copy.text = self.text.embeddings, self.text.text
            self.momentum = nnx.Dict(vision=momentum_copy(self.vision), text=momentum_copy(text_copy),
                                     vision_proj=momentum_copy(self.vision_proj),
                                     text_proj=momentum_copy(self.text_proj))
        else:
            self.momentum = None

    # ---- towers (text states, ITM and MLM logits: FusionHeads) ------------------------------------------------
    def image_tokens(self, pixels: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        """(batch, 1 + patches, width): the mean-pooled token, then the patch tokens."""
        return self.vision(pixels, rngs=rngs)[0]

    def image_features(self, image_tokens: jax.Array) -> jax.Array:
        return l2_normalize(self.vision_proj(image_tokens[:, 0]).astype(jnp.float32))

    def text_features(self, text_hidden: jax.Array) -> jax.Array:
        return l2_normalize(self.text_proj(text_hidden[:, 0]).astype(jnp.float32))

    def cnn_features(self, pixels: jax.Array) -> jax.Array:
        """Batch norms use their running statistics (frozen), where the original's timm ResNet trains them."""
        pooled = jnp.mean(self.cnn(pixels.astype(self.dtype), train=False), axis=(1, 2))
        return l2_normalize(self.cnn_proj(pooled).astype(jnp.float32))

    # ---- momentum ---------------------------------------------------------------------------------------------
    def momentum_features(self, pixels: jax.Array, tokens: jax.Array,
                          rngs: nnx.Rngs | None = None) -> tuple[jax.Array, jax.Array]:
        """Normalised (image, text) ITC features of the momentum copies, without gradient."""
        m = self.momentum
        image = m["vision"](pixels, rngs=rngs)[0]
        text = m["text"].encode_text(tokens, self.keep(tokens))
        features = (l2_normalize(m["vision_proj"](image[:, 0]).astype(jnp.float32)),
                    l2_normalize(m["text_proj"](text[:, 0]).astype(jnp.float32)))
        return jax.tree.map(jax.lax.stop_gradient, features)
