// One thread repeats a small tensor op with a number while a second thread forces garbage collections, for each of
// four forms of the op; every result is checked bit for bit against one computed up front. The implicit forms let
// TorchSharp 0.107 create a Scalar that only its finalizer frees, which a collection can do while libtorch still
// reads it; the explicit forms (what ViT22B.Torch.ScalarMath does) dispose the Scalar after the call.
//
//   dotnet run --project tests/ScalarRace -c Release -- 15      # seconds per form
#pragma warning disable RS0030 // the implicit Scalar forms are what this program measures
using System.Diagnostics;
using TorchSharp;
using static TorchSharp.torch;

double seconds = args.Length > 0 ? double.Parse(args[0], System.Globalization.CultureInfo.InvariantCulture) : 15;
torch.set_num_threads(1);
using var x = torch.tensor(new float[] { 127f, 254f, -381f, 12.7f });
using var one = 1.ToScalar();
var forms = new (string Name, Func<Tensor> Op)[]
{
    ("x / 127.0 (implicit Scalar)", () => x / 127.0),
    ("x.div(s), s disposed after", () => { using var s = 127.0.ToScalar(); return x.div(s); }),
    ("x + x (hidden alpha = 1)", () => x + x),
    ("x.add(x, one), one held", () => x.add(x, one)),
};
Console.WriteLine($"{"form",-30} {"iterations",12} {"forced GCs",11} {"exceptions",11} {"wrong values",13}");
foreach (var (name, op) in forms)
{
    float[] expected;
    using (var first = op()) expected = first.data<float>().ToArray();
    long iterations = 0, wrong = 0, collections = 0;
    var exceptions = new Dictionary<string, int>();
    bool stop = false;
    var collector = new Thread(() =>
    {
        while (!Volatile.Read(ref stop))
        {
            GC.Collect();
            GC.WaitForPendingFinalizers();
            collections++;
        }
    });
    var clock = Stopwatch.StartNew();
    collector.Start();
    while (clock.Elapsed.TotalSeconds < seconds)
    {
        try
        {
            using var result = op();
            if (!result.data<float>().ToArray().SequenceEqual(expected)) wrong++;
        }
        catch (Exception e)
        {
            string message = e.Message.Split('\n')[0];
            exceptions[message] = exceptions.GetValueOrDefault(message) + 1;
        }
        iterations++;
    }
    Volatile.Write(ref stop, true);
    collector.Join();
    Console.WriteLine($"{name,-30} {iterations,12:N0} {collections,11:N0} {exceptions.Values.Sum(),11:N0} {wrong,13:N0}");
    foreach (var (message, count) in exceptions) Console.WriteLine($"    {count}× {message}");
}
