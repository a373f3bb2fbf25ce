"""ConditionPrompts: `[SOS] ctx^s_k <condition k> <class c>. [EOT]` for every sign, condition and
class, sign-major; only the contexts are parameters, the tokens are fixed buffers; a prompt that
does not fit CLIP's context is refused exactly where the condition files' budget check says."""
import clip
import pytest
import torch
import torch.nn as nn

import conditions
from errors import FedMPTError
from prompts import ConditionPrompts

CLASSES = ["circle", "tv monitor"]
CONDITIONS = ["colour", "spatial layout"]
L = 20  # the context length of these prompts


def build(class_ctx=0, signs=2, n_ctx=3):
    torch.manual_seed(0)
    embedding = nn.Embedding(49408, 6)
    return ConditionPrompts(CLASSES, CONDITIONS, n_ctx, embedding, L, clip.tokenize, signs=signs,
                            class_ctx=class_ctx), embedding


def words(condition, name, n_ctx):
    """The token ids (L,) of a prompt with n_ctx placeholder words in the contexts' place."""
    return clip.tokenize([f"{' '.join(['X'] * n_ctx)} {condition} {name}."], context_length=L)[0]


@pytest.mark.parametrize("signs", [1, 2])
def test_each_prompt_is_sos_then_its_contexts_then_the_condition_and_class_tokens(signs):
    prompts, embedding = build(signs=signs)
    embeddings, eot = prompts()
    (K, C), M = prompts.shape, prompts.n_ctx
    n = int(eot.max()) + 1  # cut after the last end token: nothing later reaches an end token
    assert prompts.positions == n < L
    assert embeddings.shape == (signs * K * C, n, 6) and eot.shape == (signs * K * C,)
    with torch.no_grad():
        for s in range(signs):
            for k, condition in enumerate(CONDITIONS):
                for c, name in enumerate(CLASSES):
                    row, tokens = (s * K + k) * C + c, words(condition, name, M)  # sign-major, then condition
                    expected = embedding(tokens)
                    assert torch.equal(embeddings[row, :1], expected[:1])  # [SOS]
                    assert torch.equal(embeddings[row, 1:1 + M], prompts.context[s, k])  # ctx^s_k
                    assert torch.equal(embeddings[row, 1 + M:], expected[1 + M:n])  # <condition> <class>. [EOT]
                    assert int(eot[row]) == int(tokens.argmax()) and int(tokens[eot[row]]) == 49407


def test_class_contexts_follow_the_shared_ones_and_differ_per_class_not_per_condition():
    prompts, embedding = build(class_ctx=2)
    embeddings, _ = prompts()
    (K, C), M = prompts.shape, prompts.n_ctx
    assert prompts.class_context.shape == (2, C, 2, 6)
    with torch.no_grad():
        for s in range(2):
            for k, condition in enumerate(CONDITIONS):
                for c, name in enumerate(CLASSES):
                    row = (s * K + k) * C + c
                    assert torch.equal(embeddings[row, 1:1 + M], prompts.context[s, k])
                    assert torch.equal(embeddings[row, 1 + M:3 + M], prompts.class_context[s, c])
                    expected = embedding(words(condition, name, M + 2))[3 + M:prompts.positions]
                    assert torch.equal(embeddings[row, 3 + M:], expected)


def test_a_given_context_replaces_the_learned_one_and_gradients_reach_only_the_contexts():
    prompts, _ = build()
    generated = torch.randn(prompts.context.shape, requires_grad=True)  # e.g. FedTPG's generator output
    embeddings, _ = prompts(generated)
    M = prompts.n_ctx
    assert torch.equal(embeddings[5, 1:1 + M], generated[1, 0])  # sign 1, condition 0, class 1
    embeddings.sum().backward()
    assert generated.grad is not None and prompts.context.grad is None
    assert [name for name, _ in prompts.named_parameters()] == ["context"]  # the tokens are buffers
    assert set(prompts.state_dict()) == {"context"}  # and not saved: the class names rebuild them


def test_token_count_agrees_with_condition_prompts():
    """The budget check passes exactly the conditions ConditionPrompts can build."""
    embedding, outcomes = nn.Embedding(49408, 4), set()
    for n in range(1, 12):
        condition = "ab" * n
        fits = conditions.prompt_length(condition, "tv monitor", n_ctx=8) <= 20
        try:
            ConditionPrompts(["tv monitor"], [condition], 8, embedding, 20, clip.tokenize)
            built = True
        except FedMPTError:
            built = False
        assert fits == built, condition
        outcomes.add(fits)
    assert outcomes == {True, False}  # the loop crossed the budget
