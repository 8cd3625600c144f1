/* tokenizer.h: the tokenizers of GGUF files, from their tokenizer.ggml.* metadata:
 *   "gpt2"   byte-level BPE (GPT-2 family: SmolLM2), described below;
 *   "llama"  SentencePiece-style BPE (Gemma 3): "▁" for spaces, merges by vocabulary order, byte fallback <0xNN>,
 *            control and user-defined tokens matched whole (tokenizer.c, tok_load_spm, has the rules).
 *
 * Encoding = special-token split -> pre-tokenizer -> byte-to-symbol mapping -> BPE merges by rank.
 * The pre-tokenizer is chosen from tokenizer.ggml.pre: "smollm" (and "starcoder", "refact", ...) first cut every
 * \p{N} code point into its own piece (HF's Digits(individual_digits=True)), then each piece goes through the GPT-2
 * regex  's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+  implemented by hand;
 * "gpt2" and unknown names use the regex alone. */
#ifndef KVQ_TOKENIZER_H
#define KVQ_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#include "gguf.h"
#include "kvq.h"

typedef struct kvq_tokenizer kvq_tokenizer;

/* A growable array of token ids. */
typedef struct tok_ids {
    int32_t *ids;
    size_t n, cap;
} tok_ids;

kvq_status tok_ids_push(tok_ids *v, int32_t id);
void tok_ids_free(tok_ids *v);

kvq_status tok_load(const gguf_file *f, kvq_tokenizer **out);
void tok_free(kvq_tokenizer *t);

/* Appends the ids of UTF-8 `text` to `out`. parse_special: strings of control/user-defined tokens in the text
 * become those tokens (what HF does for added tokens); otherwise they are ordinary text. */
kvq_status tok_encode(const kvq_tokenizer *t, const char *text, size_t len, int parse_special, tok_ids *out);

/* Appends the instruct model's ChatML prompt for one user turn:
 *   <|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n
 * system NULL: the default system prompt of the model's template (SmolLM2's). A vocabulary with Gemma's turn tokens
 * gets Gemma's format instead (no system role; a system prompt opens the user turn, "{system}\n\n{user}"):
 *   <start_of_turn>user\n{user}<end_of_turn>\n<start_of_turn>model\n
 * Neither adds BOS (the caller does, tok_add_bos). */
kvq_status tok_encode_chat(const kvq_tokenizer *t, const char *system, const char *user, tok_ids *out);

/* The bytes a token stands for (byte-level symbols mapped back); control tokens give their text. */
const char *tok_piece(const kvq_tokenizer *t, int32_t id, size_t *len);
int tok_is_control(const kvq_tokenizer *t, int32_t id);
/* The id of the one-symbol token of byte b, or -1 when the vocabulary has none: such a byte is dropped from the
 * text by tok_encode (as HF's BPE does without an unk token). SmolLM2's vocabulary has none for 21 bytes: the
 * controls 0x04 0x06 0x13 0x14 0x16 0x1D, 0xC0 0xC1 and 0xF5..0xFF (never in valid UTF-8), and the lead bytes 0xF1
 * 0xF2 (planes 4..11). Every other byte round-trips: the pieces of tok_encode's ids concatenate to the text minus
 * those bytes. */
int32_t tok_byte_token(const kvq_tokenizer *t, uint8_t b);
/* End of generation: eos, or <|im_end|> / <|endoftext|> / <end_of_turn> when the vocabulary has them. */
int tok_is_eog(const kvq_tokenizer *t, int32_t id);
int32_t tok_n_vocab(const kvq_tokenizer *t);
int32_t tok_bos(const kvq_tokenizer *t);
int32_t tok_eos(const kvq_tokenizer *t);
int tok_add_bos(const kvq_tokenizer *t);

#endif
