namespace ViT22B.Parallel;

/// <summary>How a tensor-parallel linear layer communicates.</summary>
public enum CommMode
{
    /// <summary>The paper's asynchronous parallel linear operations: the collective is decomposed into a ring of
    /// k − 1 permutes, and the matmul of the chunk in hand runs while the next chunk travels.</summary>
    Overlapped,
    /// <summary>The plain collective, then the matmul (all-gather → matmul; matmul → reduce-scatter): the baseline.</summary>
    Plain,
}
