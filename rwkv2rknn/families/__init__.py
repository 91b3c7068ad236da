"""Model families other than RWKV-4: checkpoint readers, numpy references and graph builders."""
