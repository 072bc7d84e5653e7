"""Conversation templates: LLaVA's `plain` (stage 1) and chat templates (stage 2) with label masking."""

# Vicuna v1 as LLaVA writes it (conv_vicuna_v1, sep " " after user turns and "</s>" after assistant
# turns), as a Jinja chat template so that one mechanism renders every model's conversations.
# Content may be a string (LLaVA JSON, "<image>\n..." inline) or a list of HF content items.
VICUNA_V1_CHAT_TEMPLATE = (
    "{%- set ns = namespace(system=\"A chat between a curious human and an artificial intelligence "
    "assistant. The assistant gives helpful, detailed, and polite answers to the human's questions.\") -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set ns.system = messages[0]['content'] if messages[0]['content'] is string "
    "else messages[0]['content'][0]['text'] -%}"
    "{%- endif -%}"
    "{{- ns.system }}"
    "{%- for message in messages if message['role'] != 'system' -%}"
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
    "{%- else -%}{%- set text = namespace(v='') -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{%- set text.v = text.v + '<image>\\n' -%}"
    "{%- elif item['type'] == 'text' -%}{%- set text.v = text.v + item['text'] -%}{%- endif -%}"
    "{%- endfor -%}{%- set text = text.v -%}{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- (' ' if loop.first else '') + 'USER: ' + text + ' ' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- 'ASSISTANT: ' + text + eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' }}{%- endif -%}"
)
