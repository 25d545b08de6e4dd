"""`python -m convert FAMILY ...`: PyTorch checkpoints to jaxretrieval checkpoints and back.

  python -m convert clip SRC OUT [--format openai|open_clip|hf] [--config JSON] [--image-size N] [--bpe PATH]
  python -m convert clip-export CKPT OUT --format open_clip|hf
  python -m convert beit3 SRC.pth OUT --spm PATH [--image-size N]
  python -m convert ctl SRC.ckpt OUT [--input-size H W]      (or a torchvision ResNet-50 .pth: a backbone)
  python -m convert bert SRC_FOLDER OUT                       (Hugging Face BERT: a text tower for train.init_from)
  python -m convert bert-export CKPT OUT                      (back to a Hugging Face folder)
  python -m convert xvlm SRC.th OUT [--vocab PATH] [--image-size N] [--heads N]   (X2-VLM / CFACK: system cfack)
  python -m convert uit SRC.pth OUT [--vocab PATH] [--heads N]   (PAB's UIT / CMP: system uit)
  python -m convert swin SRC OUT [--bert FOLDER] [--vocab PATH] [--fusion-from N]
                                   (a Microsoft / timm Swin + a Hugging Face BERT: UIT's initial weights, a partial
                                    checkpoint for train.init_from)
  python -m convert blip2 SRC OUT [--vocab PATH] [--vision CLIP] [--qformer-hf FOLDER] [--heads N] [--vision-heads N]
                                  [--vision-layers N] [--image-size N]
                                  (LAVIS BLIP-2 pretrain_vitL: system blip2; SRC a Hugging Face Q-Former folder: a
                                   partial checkpoint for train.init_from)
  python -m convert vse_infty SRC.pth OUT [--vocab PATH] [--heads N]   (VSE-infinity's model_best.pth: system vse_infty)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from convert import ConvertError
from convert.sources import INSTALL_EXTRA
from jaxretrieval.errors import add_verbose, command, parse_command_line, probe_output_folder, require

# The packages each command needs before it reads anything (reading a .safetensors source also needs safetensors).
NEEDS = {"clip": ("torch",), "beit3": ("torch",), "ctl": ("torch",), "clip-export": ("safetensors",),
         "bert": ("torch",), "bert-export": ("safetensors",), "xvlm": ("torch",), "uit": ("torch",),
         "swin": ("torch",), "blip2": ("torch",), "vse_infty": ("torch",)}
WHAT = {"clip": "converted checkpoint", "beit3": "converted checkpoint", "ctl": "converted checkpoint",
        "clip-export": "exported model", "bert": "converted checkpoint", "bert-export": "exported model",
        "xvlm": "converted checkpoint", "uit": "converted checkpoint", "swin": "partial checkpoint",
        "blip2": "converted checkpoint", "vse_infty": "converted checkpoint"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m convert", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    families = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    clip = families.add_parser("clip", help="a PyTorch CLIP (OpenAI, open_clip, Hugging Face) -> our checkpoint")
    clip.add_argument("src", help="OpenAI .pt, open_clip .bin/.pt/.safetensors, or a Hugging Face / open_clip folder")
    clip.add_argument("out", help="new folder for the checkpoint (must not exist)")
    clip.add_argument("--format", choices=["openai", "open_clip", "hf"], help="default: told from SRC")
    clip.add_argument("--config", help="the model's config JSON (default: open_clip_config.json or config.json "
                                       "beside SRC)")
    clip.add_argument("--image-size", type=int, help="resample the image positional embedding to this input size")
    clip.add_argument("--bpe", help="CLIP BPE merges file (default: the one open_clip ships)")

    export = families.add_parser("clip-export", help="our CLIP checkpoint -> open_clip or Hugging Face files")
    export.add_argument("checkpoint", help="step folder, checkpoints folder or workdir")
    export.add_argument("out", help="new folder for the exported model (must not exist)")
    export.add_argument("--format", required=True, choices=["open_clip", "hf"])

    beit3 = families.add_parser("beit3", help="a unilm BEiT-3 .pth (retrieval fine-tune or pretrained) -> our "
                                              "checkpoint")
    beit3.add_argument("src", help="unilm checkpoint: {'model': state_dict}, or a bare state dict")
    beit3.add_argument("out", help="new folder for the checkpoint (must not exist)")
    beit3.add_argument("--spm", required=True, help="the XLM-R sentencepiece model BEiT-3 was trained with "
                                                    "(beit3.spm); embedded in the checkpoint")
    beit3.add_argument("--image-size", type=int, help="resample the vision position table to this input size")

    ctl = families.add_parser("ctl", help="a Centroids-ReID Lightning .ckpt, or torchvision ResNet-50 weights (a "
                                          "backbone for train.init_from) -> our checkpoint")
    ctl.add_argument("src", help="the .ckpt ({'state_dict': ...}) or a torchvision / IBN-Net ResNet-50 .pth")
    ctl.add_argument("out", help="new folder for the checkpoint (must not exist)")
    ctl.add_argument("--input-size", type=int, nargs=2, default=(256, 128), metavar=("H", "W"),
                     help="the input size the model was trained at (default 256 128; 320 320 for Street2Shop)")
    bert = families.add_parser("bert", help="a Hugging Face BERT folder (BertModel, BertForMaskedLM, fusion BERT) -> "
                                            "a partial checkpoint for a system's text tower")
    bert.add_argument("src", help="folder with config.json and model.safetensors or pytorch_model.bin")
    bert.add_argument("out", help="new folder for the checkpoint (must not exist)")
    bert_export = families.add_parser("bert-export", help="a converted BERT checkpoint -> a Hugging Face folder")
    bert_export.add_argument("checkpoint", help="what `convert bert` wrote")
    bert_export.add_argument("out", help="new folder for the exported model (must not exist)")
    xvlm = families.add_parser("xvlm", help="an X2-VLM or CFACK .th (BEiT-2 + fusion BERT, momentum copies if any) "
                                            "-> a system cfack checkpoint")
    xvlm.add_argument("src", help="the checkpoint: {'model': state_dict, 'config': ...} or a bare state dict")
    xvlm.add_argument("out", help="new folder for the checkpoint (must not exist)")
    xvlm.add_argument("--vocab", help="the BERT vocab.txt (or tokenizer.json) it was trained with; embedded in the "
                                      "checkpoint (load and evaluate need it)")
    xvlm.add_argument("--image-size", type=int, help="resample the relative position tables to this input size")
    xvlm.add_argument("--heads", type=int, help="the BERT's attention heads (default: its width / 64, as "
                                                "bert-base and bert-large)")
    uit = families.add_parser("uit", help="a UIT / CMP .pth (PAB's CMP baseline: Swin + fusion BERT, SimMIM) -> a "
                                          "system uit checkpoint")
    uit.add_argument("src", help="the checkpoint: {'model': state_dict, 'config': ...} or a bare state dict")
    uit.add_argument("out", help="new folder for the checkpoint (must not exist)")
    uit.add_argument("--vocab", help="the BERT vocab.txt (or tokenizer.json) it was trained with; embedded in the "
                                     "checkpoint (load and evaluate need it)")
    uit.add_argument("--heads", type=int, help="the BERT's attention heads (default: its width / 64, as bert-base "
                                               "and bert-large)")
    swin = families.add_parser("swin", help="a Microsoft or timm Swin (and a Hugging Face BERT folder) -> a partial "
                                            "system uit checkpoint for train.init_from (UIT's initial weights)")
    swin.add_argument("src", help="Microsoft's {'model': state_dict} .pth (swin_base_patch4_window7_224_22k.pth) or "
                                  "a timm state dict (.pth, .bin, .safetensors)")
    swin.add_argument("out", help="new folder for the checkpoint (must not exist)")
    swin.add_argument("--bert", help="a Hugging Face BERT folder (bert-base-uncased): the text tower; the fusion "
                                     "layers' cross-attention starts fresh")
    swin.add_argument("--vocab", help="the BERT vocab.txt to embed as the tokenizer (default: the --bert folder's)")
    swin.add_argument("--fusion-from", type=int, help="the first BERT layer that cross-attends to the image (default: "
                                                      "config.json's fusion_layer, else 6)")
    blip2 = families.add_parser("blip2", help="a LAVIS BLIP-2 checkpoint (pretrain_vitL: CLIP ViT-L + Q-Former) -> a "
                                              "system blip2 checkpoint; transformers' Q-Former weights")
    blip2.add_argument("src", help="LAVIS's {'model': state_dict} .pth (or a bare state dict), or a Hugging Face "
                                   "Blip2QFormerModel / Blip2ForImageTextRetrieval folder (its Q-Former only: a "
                                   "partial checkpoint for train.init_from)")
    blip2.add_argument("out", help="new folder for the checkpoint (must not exist)")
    blip2.add_argument("--vocab", help="BLIP-2's bert-base-uncased vocab.txt (or tokenizer.json); embedded in the "
                                       "checkpoint (load and evaluate need it)")
    blip2.add_argument("--vision", help="the CLIP the ViT comes from when SRC holds no visual_encoder.* (LAVIS saves "
                                        "none with freeze_vit): OpenAI ViT-L-14.pt, an open_clip file or folder, a "
                                        "Hugging Face CLIP folder or LAVIS's clip_vit_L.pth")
    blip2.add_argument("--qformer-hf", metavar="FOLDER", help="a Hugging Face Blip2QFormerModel / "
                                                              "Blip2ForImageTextRetrieval folder whose Q-Former "
                                                              "(and heads, where it has them) replace SRC's")
    blip2.add_argument("--heads", type=int, help="the Q-Former's attention heads (default: its width / 64)")
    blip2.add_argument("--vision-heads", type=int, help="the ViT's attention heads (default: its CLIP config's, "
                                                        "else its width / 64)")
    blip2.add_argument("--vision-layers", type=int, help="the image blocks taken from --vision (default: 23 of a "
                                                         "ViT-L, as LAVIS's clip_L; all but the last otherwise)")
    blip2.add_argument("--image-size", type=int, help="resample the ViT's position grid to this input size, as "
                                                      "LAVIS does (bicubic, corners aligned)")
    vse = families.add_parser("vse_infty", help="a VSE-infinity checkpoint (BUTD regions + BERT, GPO) -> a system "
                                                "vse_infty checkpoint")
    vse.add_argument("src", help="model_best.pth ({'model': [img_enc, txt_enc], 'opt': ...}) or a plain state dict")
    vse.add_argument("out", help="new folder for the checkpoint (must not exist)")
    vse.add_argument("--vocab", help="bert-base-uncased's vocab.txt (or tokenizer.json); embedded in the checkpoint "
                                     "(load and evaluate need it)")
    vse.add_argument("--heads", type=int, help="the BERT's attention heads (default: its width / 64)")
    add_verbose(parser)
    # -v after the family name too, without resetting one given before it
    for family in (clip, export, beit3, ctl, bert, bert_export, xvlm, uit, swin, blip2, vse):
        family.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                            help="show the traceback of an error")
    return parser


def check_out(out: str) -> None:
    """OUT must be new and its folder writable, proven before any weights are read (and leaving nothing behind)."""
    path = Path(out).expanduser().absolute()
    if path.exists():
        raise ConvertError(f"{path} already exists; choose a new output folder")
    probe_output_folder(path, "OUT")


def _run(args: argparse.Namespace) -> str:
    if args.command == "vse_infty":
        from convert.vse import import_vse

        return str(import_vse(args.src, args.out, vocab=args.vocab, heads=args.heads))
    if args.command == "blip2":
        from convert.blip2 import import_blip2

        return str(import_blip2(args.src, args.out, vocab=args.vocab, vision=args.vision, qformer_hf=args.qformer_hf,
                                heads=args.heads, vision_heads=args.vision_heads, vision_layers=args.vision_layers,
                                image_size=args.image_size))
    if args.command in ("bert", "bert-export"):
        from convert.bert import export_bert, import_bert

        if args.command == "bert":
            return str(import_bert(args.src, args.out))
        return str(export_bert(args.checkpoint, args.out))
    if args.command == "xvlm":
        from convert.xvlm import import_xvlm

        return str(import_xvlm(args.src, args.out, vocab=args.vocab, image_size=args.image_size, heads=args.heads))
    if args.command in ("uit", "swin"):
        from convert.uit import import_swin, import_uit

        if args.command == "uit":
            return str(import_uit(args.src, args.out, vocab=args.vocab, heads=args.heads))
        return str(import_swin(args.src, args.out, bert=args.bert, vocab=args.vocab, fusion_from=args.fusion_from))
    if args.command == "ctl":
        from convert.ctl import import_ctl

        return str(import_ctl(args.src, args.out, input_size=tuple(args.input_size)))
    if args.command == "beit3":
        from convert.beit3 import import_beit3

        return str(import_beit3(args.src, args.out, spm=args.spm, image_size=args.image_size))
    from convert.clip import export_clip, import_clip

    if args.command == "clip":
        return str(import_clip(args.src, args.out, fmt=args.format, config=args.config, image_size=args.image_size,
                               bpe=args.bpe))
    return str(export_clip(args.checkpoint, args.out, fmt=args.format))


@command
def main(argv: list[str] | None = None) -> int:
    args = parse_command_line(_parser(), argv)
    for module in NEEDS[args.command]:
        require(module, INSTALL_EXTRA, f"python -m convert {args.command}")
    check_out(args.out)
    written = _run(args)
    print(f"wrote the {WHAT[args.command]} to {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
