"""Every fast path over AdaKV's bytes, each beside its oracle. Knows bytes (quant), never blocks or backends.

    role      oracle (fp32 / torch, here or in quant/)    fast paths
    seal      page_codec.PageCodec.encode                 cpu.encode_pages (csrc/cpu_seal.cpp)
              (itself equal to quant.reference.pack_page)  triton_seal.seal_pages
    decode    attention_ref.paged_attention_ref           cpu.paged_attention (csrc/cpu_decode.cpp),
                                                          cpu.DecodeStep (the same, once per step)
                                                          triton_decode.paged_attention_triton
    feature   quant.reference.relative_errors             cpu.relative_errors (csrc/cpu_qerr.cpp)

library.py builds, caches and loads the one compiled CPU library (csrc/); Triton modules are
imported lazily by whoever needs them (CI has no GPU; their tests run under TRITON_INTERPRET=1).
Every decode path takes the same tensors in the same order -- (query, pages, staging_key,
staging_value, staging_slot, block_table, seq_lens, query_start_loc) with one layer's pages as
[num_blocks, page_bytes] uint8 and staging as [num_slots, block_size, num_kv_heads, head_size] -- and
fills out[:num_tokens]; every seal path turns [n, block_size, num_kv_heads, head_size] 16-bit K/V and
[n, block_size] bits into the same page bytes.
"""
