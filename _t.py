import os; os.environ["TRITON_INTERPRET"]="1"
import torch, fastvae, time
for B, D in ((1000, 4), (200, 16), (4, 256), (2000, 2)):
    mu = torch.zeros(B, D, requires_grad=True); L = torch.eye(D).expand(B, D, D).clone().requires_grad_()
    with fastvae.use_backend("triton"):
        t=time.time(); z, kl = fastvae.reparameterize_kl_tril(mu, L); t1=time.time()
        (z.sum()+kl.sum()).backward(); t2=time.time()
    print(B, D, "fwd %.2f bwd %.2f" % (t1-t, t2-t1))
